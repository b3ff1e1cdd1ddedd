"""Final-answer extractors for generated chain-of-thought text.

GSM8K follows lm-evaluation-harness: "strict" reads the answer from the marked format
("#### N" of the gsm8k task, "The answer is N." of gsm8k-cot), "flexible" takes the last
number in the text (regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)``); both are compared as strings
after `normalize_number`. Extractors return None when nothing matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Where lm-eval's "The answer is (...)." needs one more character after the number, this
# accepts the number at the very end of the text and an optional "$" before it.
_STRICT = re.compile(r"#### \$?(-?[0-9.,]+)|The answer is \$?(-?[0-9.,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_YES_NO_MARKED = re.compile(r"\banswer(?: is|:)\s*\**\s*(yes|no)\b", re.IGNORECASE)
_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def normalize_number(s: str | None) -> str | None:
    """lm-eval's GSM8K normalisation: drop commas and "$", then one trailing period
    ("$1,000." -> "1000"). None stays None."""
    if s is None:
        return None
    s = s.strip().replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


def gsm8k_strict(text: str) -> str | None:
    """The number after the first "#### " or "The answer is " (normalised), else None."""
    m = _STRICT.search(text)
    if m is None:
        return None
    return normalize_number(m.group(1) or m.group(2)) or None


def gsm8k_flexible(text: str) -> str | None:
    """The last number-like match in the text (normalised), else None. Unlike lm-eval,
    matches without a digit ("...", "$,") are skipped rather than returned."""
    matches = _FLEXIBLE.findall(text)
    for groups in reversed(matches):
        value = normalize_number(next((g for g in groups if g), ""))
        # "$." or "," alone match the first alternative but hold no digit.
        if value and re.search(r"[0-9]", value):
            return value
    return None


def yes_no(text: str) -> str | None:
    """ "yes" / "no" from a StrategyQA answer: the first "answer is yes|no" or "answer: yes|no"
    (any case, markdown bold allowed), else the first standalone word yes or no, else None."""
    m = _YES_NO_MARKED.search(text) or _YES_NO_WORD.search(text)
    return m.group(1).lower() if m else None


def choice_letter(text: str, labels: Sequence[str]) -> str | None:
    """The chosen label (one of `labels`, e.g. "A".."E" or "1".."4") from ARC CoT text.

    In order of preference, the first of: "answer is X" / "answer is (X)", "Answer: X",
    "(X)", and a label opening the text ("B." / "B)" / "B:") or standing alone. Labels are
    matched case-sensitively as whole tokens, so the article "a" or "A" inside a sentence
    is not read as a choice.
    """
    if not labels:
        return None
    alt = "|".join(re.escape(str(lab)) for lab in sorted(labels, key=len, reverse=True))
    patterns = [
        rf"(?i:answer\s+is)\s*:?\s*\**\s*\(?({alt})\)?(?![\w])",
        rf"(?i:answer)\s*:\s*\**\s*\(?({alt})\)?(?![\w])",
        rf"\(({alt})\)",
        rf"^\s*\**\(?({alt})(?:[.):]|\s*$)",
    ]
    for p in patterns:
        m = re.search(p, text)
        if m:
            return m.group(1)
    return None
