"""A built-in, generated set of multi-step arithmetic word problems.

Each problem starts from a small count and applies 2-4 operations (buy groups, gain,
give away, multiply, split), for example::

    question:  Tom has 12 apples. He buys 3 bags with 5 apples each. Then he gives
               away 7 apples. How many apples does Tom have now?
    reasoning: He buys 3 * 5 = 15 apples. 12 + 15 = 27. 27 - 7 = 20.
    answer:    20

Every step in the reasoning has the form ``a op b = c`` with op in ``+ - * /``. All
intermediate and final values are integers in [1, 1000), so a 135M model has a chance.

Splits are disjoint by construction: a problem belongs to "calib" or "eval" according
to the parity of a hash of its question text, so no seed or size of one split can
produce a question of the other. The two splits also draw from different RNG streams.
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS: tuple[str, ...] = ("calib", "eval")
MAX_VALUE = 1000  # every value in a problem stays below this

# the names (and pronouns) and items of the word problems (capjax.data.organism's too)
PEOPLE = (
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Mia", "she"),
    ("Sam", "he"),
    ("Lily", "she"),
    ("Omar", "he"),
    ("Nora", "she"),
    ("Leo", "he"),
    ("Zoe", "she"),
)
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "stamps", "shells", "balloons", "books")

_CONTAINERS = ["bags", "boxes", "packs", "jars"]


def _split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return SPLITS[digest[0] % 2]


def _step(rng: np.random.Generator, x: int, item: str, pron: str) -> tuple[str, list[str], int] | None:
    """One random operation on the count ``x``: (clause, reasoning steps, new count),
    or None when the drawn operation does not fit ``x``."""
    kind = rng.integers(5)
    if kind == 0:  # buy k groups of m
        k, m = int(rng.integers(2, 7)), int(rng.integers(2, 10))
        p, y = k * m, x + k * m
        container = _CONTAINERS[rng.integers(len(_CONTAINERS))]
        clause = f"{pron} buys {k} {container} with {m} {item} each"
        return clause, [f"{pron.capitalize()} buys {k} * {m} = {p} {item}.", f"{x} + {p} = {y}."], y
    if kind == 1:  # gain m
        m = int(rng.integers(2, 21))
        verb = ("finds", "gets", "receives")[rng.integers(3)]
        return f"{pron} {verb} {m} more {item}", [f"{x} + {m} = {x + m}."], x + m
    if kind == 2:  # give away m, keeping at least one
        if x < 3:
            return None
        m = int(rng.integers(2, x))
        verb = ("gives away", "loses", "sells")[rng.integers(3)]
        return f"{pron} {verb} {m} {item}", [f"{x} - {m} = {x - m}."], x - m
    if kind == 3:  # multiply
        f = int(rng.integers(2, 4))
        word = {2: "twice", 3: "three times"}[f]
        return f"{pron} ends up with {word} as many {item}", [f"{x} * {f} = {x * f}."], x * f
    divisors = [k for k in range(2, 6) if x % k == 0 and x // k >= 2]
    if not divisors:
        return None
    k = divisors[rng.integers(len(divisors))]
    clause = f"{pron} splits the {item} equally into {k} groups and keeps one group"
    return clause, [f"{x} / {k} = {x // k}."], x // k


def _problem(rng: np.random.Generator) -> dict | None:
    name, pron = PEOPLE[rng.integers(len(PEOPLE))]
    item = ITEMS[rng.integers(len(ITEMS))]
    x = int(rng.integers(2, 31))
    sentences = [f"{name} has {x} {item}."]
    reasoning: list[str] = []
    for i in range(int(rng.integers(2, 5))):
        out = _step(rng, x, item, pron)
        if out is None:
            return None
        clause, steps, x = out
        if x >= MAX_VALUE:
            return None
        sentences.append((clause[0].upper() + clause[1:] if i == 0 else f"Then {clause}") + ".")
        reasoning.extend(steps)
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    return {"question": question, "reasoning": " ".join(reasoning), "answer": str(x)}


def synthetic_problems(n: int, seed: int = 0, split: str = "calib") -> list[dict]:
    """``n`` distinct generated problems of ``split`` ("calib" or "eval"), deterministic
    in ``seed``. Records have the shape of ``load_records``: ``{"id", "question",
    "reasoning", "answer"}``; ``id`` is ``"synthetic/<hash of question>"``."""
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; known: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        rec = _problem(rng)
        if rec is None or rec["question"] in seen or _split_of(rec["question"]) != split:
            continue
        seen.add(rec["question"])
        digest = hashlib.sha256(rec["question"].encode("utf-8")).hexdigest()[:16]
        out.append({"id": f"synthetic/{digest}", **rec})
    else:
        raise RuntimeError(f"could not generate {n} distinct synthetic problems")
    return out
