"""Multi-step word problems small enough for a model trained from scratch on a CPU (the
reasoning organism, `capjax.organism`).

Each problem starts from a count below 20 and applies 2-4 operations (gain, find, give away,
lose, double); every step of the chain of thought is written out as ``a op b = c``::

    question:  Tom has 7 apples . He gets 5 more apples . Then he gives away 3 apples .
               How many apples does Tom have now ?
    reasoning: 7 + 5 = 12 . 12 - 3 = 9 .
    answer:    9

Words, numbers and punctuation are separated by single spaces, so a word-level tokenizer
(`capjax.organism.tokenizer`) gives every number one token and decodes the text back exactly.
Every value stays in [1, MAX_VALUE) and every added or removed amount below MAX_STEP, so the
whole arithmetic is a table of under a thousand facts that a tiny model can learn exactly.

Splits are disjoint by construction, as in `capjax.data.synthetic`: a question belongs to
"train" or "eval" by a hash of its text, so no seed or size of one split can yield a question
of the other; the splits also draw from different RNG streams.
"""

from __future__ import annotations

import hashlib

import numpy as np

from capjax.data.synthetic import ITEMS, PEOPLE  # the same names and items as the synthetic task

SPLITS: tuple[str, ...] = ("train", "eval")
MAX_VALUE = 50  # every count in a problem stays below this
MAX_STEP = 10  # amounts gained or removed are in [1, MAX_STEP)
MIN_STEPS, MAX_STEPS = 2, 4

# kind -> (clause template, operator); {p} pronoun, {m} amount, {i} item
OPERATIONS: dict[str, tuple[str, str]] = {
    "gets": ("{p} gets {m} more {i}", "+"),
    "finds": ("{p} finds {m} {i}", "+"),
    "gives": ("{p} gives away {m} {i}", "-"),
    "loses": ("{p} loses {m} {i}", "-"),
    "doubles": ("{p} doubles the {i}", "*"),
}


def _split_of(question: str) -> str:
    return SPLITS[hashlib.sha256(question.encode("utf-8")).digest()[0] % 2]


def _operation(rng: np.random.Generator, x: int) -> tuple[str, str, int, int] | None:
    """(kind, operator, operand, new count) of one random operation on x, or None when it does not fit."""
    kind = list(OPERATIONS)[int(rng.integers(len(OPERATIONS)))]
    op = OPERATIONS[kind][1]
    if op == "*":
        return (kind, op, 2, 2 * x) if 2 * x < MAX_VALUE else None
    if op == "-":
        if x < 2:
            return None
        m = int(rng.integers(1, min(x, MAX_STEP)))
        return kind, op, m, x - m
    m = int(rng.integers(1, MAX_STEP))
    return (kind, op, m, x + m) if x + m < MAX_VALUE else None


def _problem(rng: np.random.Generator) -> dict | None:
    name, pron = PEOPLE[int(rng.integers(len(PEOPLE)))]
    item = ITEMS[int(rng.integers(len(ITEMS)))]
    x = int(rng.integers(1, 20))
    sentences, steps = [f"{name} has {x} {item} ."], []
    for i in range(int(rng.integers(MIN_STEPS, MAX_STEPS + 1))):
        out = _operation(rng, x)
        if out is None:
            return None
        kind, op, m, y = out
        clause = OPERATIONS[kind][0].format(p=pron.capitalize() if i == 0 else pron, m=m, i=item)
        sentences.append((clause if i == 0 else f"Then {clause}") + " .")
        steps.append(f"{x} {op} {m} = {y} .")
        x = y
    sentences.append(f"How many {item} does {name} have now ?")
    return {"question": " ".join(sentences), "reasoning": " ".join(steps), "answer": str(x), "steps": len(steps)}


def organism_problems(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct problems of `split` ("train" or "eval"), deterministic in `seed`: records
    {"id", "question", "reasoning", "answer", "steps"} (the shape of `capjax.data.load_records`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown organism split {split!r}; known: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 7])
    out: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        rec = _problem(rng)
        if rec is None or rec["question"] in seen or _split_of(rec["question"]) != split:
            continue
        seen.add(rec["question"])
        out.append({"id": "organism/" + hashlib.sha256(rec["question"].encode()).hexdigest()[:16], **rec})
    if len(out) == n:
        return out
    raise RuntimeError(f"could not generate {n} distinct organism problems")


def vocabulary() -> list[str]:
    """Every word a problem, its prompt ("Question : ... Answer :") and its answer ("... The
    answer is N .") can contain, in a fixed order."""
    words = [
        "Question",
        ":",
        "Answer",
        "The",
        "answer",
        "is",
        ".",
        "?",
        "+",
        "-",
        "*",
        "=",
        "Then",
        "has",
        "How",
        "many",
        "does",
        "have",
        "now",
        "more",
        "away",
        "the",
    ]
    for name, pron in PEOPLE:
        words += [name, pron, pron.capitalize()]
    words += list(ITEMS)
    for template, _ in OPERATIONS.values():
        words += [w for w in template.split() if not w.startswith("{")]
    words += [str(i) for i in range(2 * MAX_VALUE)]
    return list(dict.fromkeys(words))
