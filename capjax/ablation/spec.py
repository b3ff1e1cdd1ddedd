"""Ablation specs: which components are ablated, as one pytree of fractional masks.

Legend: N ablations, L layers, H query heads.

    spec = {"heads": [N, L, H], "mlp": [N, L], "attn": [N, L]}   float, 1 = intact, 0 = replaced

A value in between interpolates: output = keep * output + (1 - keep) * replacement (the
replacement depends on the ablation kind, `capjax.ablation.kinds`). "heads" mixes each head's
attention output before o_proj (where CAP ablates a head); "attn" the whole attention block's output
(after o_proj); "mlp" the MLP block's output. Any combination runs in one vmapped call.
"""

from __future__ import annotations

import itertools

import numpy as np

COMPONENTS = ("heads", "mlp", "attn")


def _unit_shape(config, component: str) -> tuple[int, ...]:
    if component == "heads":
        return (config.num_layers, config.num_heads)
    if component in ("mlp", "attn"):
        return (config.num_layers,)
    raise ValueError(f"unknown ablation component {component!r}: use one of {', '.join(COMPONENTS)}")


def ablation_spec(config, n: int = 1, heads=None, mlp=None, attn=None) -> dict[str, np.ndarray]:
    """A spec of n ablations, every unset component intact (ones). heads [N, L, H]; mlp, attn [N, L]
    (float32 numpy); a given array must have exactly that shape."""
    given = {"heads": heads, "mlp": mlp, "attn": attn}
    spec = {}
    for name in COMPONENTS:
        shape = (n, *_unit_shape(config, name))
        value = given[name]
        if value is None:
            spec[name] = np.ones(shape, np.float32)
            continue
        value = np.asarray(value, np.float32)
        if value.shape != shape:
            axes = "N, L, H" if name == "heads" else "N, L"
            raise ValueError(f"ablation spec {name!r} must have shape {list(shape)} ({axes}), got {list(value.shape)}")
        spec[name] = value
    return spec


def num_ablations(spec: dict) -> int:
    """N of a spec (every component must agree)."""
    ns = {k: np.shape(v)[0] for k, v in spec.items()}
    if len(set(ns.values())) != 1:
        raise ValueError(f"ablation spec components disagree on N: {ns}")
    unknown = set(spec) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown ablation spec keys {sorted(unknown)}: use {', '.join(COMPONENTS)}")
    return next(iter(ns.values()))


def units(config, component: str) -> list[tuple]:
    """Every unit of a component: (component, l, h) for heads, (component, l) for mlp / attn."""
    return [(component, *idx) for idx in np.ndindex(*_unit_shape(config, component))]


def units_spec(config, selected: list[tuple], value: float = 0.0) -> dict[str, np.ndarray]:
    """One ablation per unit in `selected` (from `units`), that unit set to `value`."""
    spec = ablation_spec(config, len(selected))
    for i, (component, *idx) in enumerate(selected):
        spec[component][(i, *idx)] = value
    return spec


def single_spec(config, component: str = "heads", value: float = 0.0) -> dict[str, np.ndarray]:
    """Every single-unit ablation of a component: N = L * H (heads, row l * H + h) or L."""
    return units_spec(config, units(config, component), value)


def pairs_spec(
    config, selected: list[tuple], value: float = 0.0
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """Every pair of the units in `selected` ablated together: (spec with N = M (M - 1) / 2,
    the (i, j) index pairs into `selected`, i < j)."""
    pairs = list(itertools.combinations(range(len(selected)), 2))
    spec = ablation_spec(config, len(pairs))
    for n, (i, j) in enumerate(pairs):
        for component, *idx in (selected[i], selected[j]):
            spec[component][(n, *idx)] = value
    return spec, pairs


def concat_specs(*specs: dict) -> dict[str, np.ndarray]:
    """Specs stacked along N."""
    return {k: np.concatenate([s[k] for s in specs]) for k in COMPONENTS}
