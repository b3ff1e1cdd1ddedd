"""A progress bar that compiled code advances. `tick` is the host callback (`jax.debug.callback`)
that a jitted scan or map takes as a static argument (`single_unit_values(on_layer=tick)`); each call
advances the bar that `showing` holds open, and does nothing while none is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_OPEN: dict[str, Any] = {}


def tick(_unit) -> None:
    """Advances the open bar by one (the argument, the unit's index, is not used)."""
    bar = _OPEN.get("bar")
    if bar is not None:
        bar.update(1)


@contextmanager
def showing(bar) -> Iterator[Any]:
    """While open, `tick` advances `bar` (a tqdm bar, or None: ticks do nothing); closes it on exit."""
    _OPEN["bar"] = bar
    try:
        yield bar
    finally:
        _OPEN.pop("bar", None)
        if bar is not None:
            bar.close()
