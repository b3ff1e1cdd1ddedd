"""The public API names the shape of every array it takes or holds (docs/conventions.md).

Public: what `capjax/__init__.py` exports (functions, the public methods of exported classes and
the array fields of exported dataclasses). An array parameter is one annotated `Array`,
`np.ndarray` or `ArrayLike`, or an unannotated one with one of capjax's array names (`ARRAY_NAMES`).
Its docstring (a method's together with its class's) must name it followed by a bracketed shape,
`tokens [B, T]`, `tokens: [B, T]` or `tokens, loss_mask [B, T]`, whose letters are the legend's
(tests/test_legends.py, one letter per meaning), digits, `...`, or a lowercase name for a size that
has no letter (`[n_windows]`); `[]` is a scalar.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np
import pytest

import capjax
from test_legends import SYNONYMS

LETTERS = set(SYNONYMS)
# Parameters capjax gives these names hold arrays, whether annotated or not.
ARRAY_NAMES = {"tokens", "token_ids", "loss_mask", "attention_mask", "head_mask", "positions", "segment_ids"}
_ARRAY_TYPE = re.compile(r"\b(Array|ndarray|ArrayLike)\b")
_DIM = re.compile(r"\.\.\.|\d+|[a-z][a-z0-9_]*|[A-Z](?:\s*(?://|[*+/-])\s*(?:[A-Z]|\d+))*(?:\s*=\s*\w+)?")


def _is_array(name: str, annotation) -> bool:
    if annotation is inspect.Parameter.empty:
        return name in ARRAY_NAMES
    return bool(_ARRAY_TYPE.search(annotation if isinstance(annotation, str) else repr(annotation)))


def _shape_ok(shape: str) -> bool:
    """`shape` is the text between the brackets: empty (a scalar) or dimensions (see above)."""
    dims = [d.strip() for d in shape.split(",")] if shape.strip() else []
    for d in dims:
        m = _DIM.fullmatch(d)
        if m is None or not set(re.findall(r"[A-Z]", d)) <= LETTERS:
            return False
    return True


def names_shape(doc: str, name: str) -> bool:
    """The docstring names `name` (plain or in backticks, alone or in a list of names that share one
    shape) right before a bracketed legend shape."""
    word = r"`{0,2}\w+`{0,2}"
    pattern = rf"(?<![\w.`])`{{0,2}}{re.escape(name)}`{{0,2}}(?:\s*(?:,|and)\s*{word})*\s*:?\s*\[([^\[\]]*)\]"
    return any(_shape_ok(m.group(1)) for m in re.finditer(pattern, doc))


def public_callables(module=capjax):
    """(qualified name, signature, docstring) of every public function and method of the exports."""
    out = []
    for export in module.__all__:
        obj = getattr(module, export)
        if inspect.isfunction(obj):
            out.append((export, inspect.signature(obj), inspect.getdoc(obj) or ""))
        elif inspect.isclass(obj):
            class_doc = inspect.getdoc(obj) or ""
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__call__"):
                    doc = (inspect.getdoc(member) or "") + "\n" + class_doc
                    out.append((f"{export}.{attr}", inspect.signature(member), doc))
    return out


def public_fields(module=capjax):
    """(qualified name, field name, annotation, class docstring) of the exported dataclasses' fields."""
    return [
        (f"{export}.{f.name}", f.name, f.type, inspect.getdoc(getattr(module, export)) or "")
        for export in module.__all__
        if dataclasses.is_dataclass(getattr(module, export))
        for f in dataclasses.fields(getattr(module, export))
    ]


def missing_shapes(callables, fields) -> list[str]:
    problems = []
    for qualname, sig, doc in callables:
        for p in sig.parameters.values():
            if p.name != "self" and _is_array(p.name, p.annotation) and not names_shape(doc, p.name):
                problems.append(
                    f"{qualname}({p.name}): its docstring gives no shape ('{p.name} [...]', legend letters)"
                )
    for qualname, name, annotation, doc in fields:
        if _is_array(name, annotation) and not names_shape(doc, name):
            problems.append(f"{qualname}: the class docstring gives no shape ('{name}: [...]', legend letters)")
    return problems


def test_public_api_names_every_array_shape():
    callables = public_callables()
    assert len(callables) > 20 and any(q == "score_heads" for q, _, _ in callables)
    assert missing_shapes(callables, public_fields()) == []


def test_the_check_finds_a_missing_or_foreign_shape():
    def score(tokens, loss_mask, scale: float = 1.0):
        """Scores tokens [B, T]."""

    def undocumented(x: np.ndarray):
        """Sums x."""

    def foreign(x: np.ndarray):
        """x [B, Q]: Q is no legend letter."""

    def shared(tokens, loss_mask, n: int):
        """tokens, `loss_mask` [B, T]; n ablations."""

    found = missing_shapes(
        [(f.__name__, inspect.signature(f), f.__doc__) for f in (score, undocumented, foreign, shared)], []
    )
    assert found == [
        "score(loss_mask): its docstring gives no shape ('loss_mask [...]', legend letters)",
        "undocumented(x): its docstring gives no shape ('x [...]', legend letters)",
        "foreign(x): its docstring gives no shape ('x [...]', legend letters)",
    ]


@pytest.mark.parametrize(
    "doc, ok",
    [
        ("masks [N, L, H]", True),
        ("`masks` [N, L, H]", True),
        ("masks: [L * H, B]", True),
        ("masks [T=seq_len]", True),
        ("masks [...,E]", True),
        ("masks []", True),
        ("masks [D/2]", True),
        ("the masks [N, L, H]", True),
        ("submasks [N]", False),
        ("x.masks [N]", False),
        ("masks (bool) [N]", False),
        ("masks [n_rows, L]", True),
        ("masks [Q]", False),
        ("masks [b t]", False),
        ("masks [B, Tx]", False),
    ],
)
def test_names_shape(doc, ok):
    assert names_shape(doc, "masks") is ok
