"""Head scores -> head importance -> per-weight scores (paper section 3.3), and the prunable layout.

Legend: L layers, H query heads, K kv heads, G = H // K, D head dim, E hidden, F MLP width.

The prunable kernels are the family's (`capjax.families.base.Kernel`), keyed by their
'/'-joined path in the params tree. Each kernel's region factor follows the axis its spec names:

    heads "query"  its own head's I (q_proj [L, E, H, D], o_proj [L, H, D, E] for Llama)
    heads "kv"     kv_rule (mean | max) over the G query heads sharing the kv head (k, v)
    no heads       the layer's mean head I (the MLP kernels)

Embeddings, lm_head, norms and biases are never pruned. In HF's [out, in] view a kernel's input
axes are its spec's `n_in` axes right after L. Functions without a `family` argument use
`capjax.families.DEFAULT`, whose prunable layout every family shares.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.families import DEFAULT, Family

Array = jax.Array
Params = dict[str, Any]

# path -> number of input axes after the layer axis
PRUNABLE: dict[str, int] = {k.path: k.n_in for k in DEFAULT.kernels}
KV_RULES = ("mean", "max")


def get_path(tree: Params, path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def get_kernels(params: Params, family: Family = DEFAULT) -> dict[str, Array]:
    """The stacked prunable kernels, keyed by path."""
    return {k.path: get_path(params, k.path) for k in family.kernels}


def rows_view(kernel: Array, path: str, stacked: bool = True) -> Array:
    """A stacked kernel [L, in..., out...] as [L, in, out] (or one layer's [in..., out...] as
    [in, out] with stacked=False): the transpose of HF's [out, in] weight."""
    lead = kernel.shape[:1] if stacked else ()
    ins = kernel.shape[len(lead) : len(lead) + PRUNABLE[path]]
    return kernel.reshape(*lead, int(np.prod(ins)), -1)


def head_delta(head_scores: Any) -> np.ndarray:
    """delta [L, H] from a HeadScores-like object (`.delta`) or an array; float64 numpy."""
    delta = getattr(head_scores, "delta", head_scores)
    if delta is None:
        raise ValueError("head scores have no delta")
    return np.asarray(jax.device_get(delta), dtype=np.float64)


# Scores whose largest magnitude is below this fraction of the loss scale (max(1, |baseline|))
# are float32 rounding, not a measurement (e.g. gradient scores of a metric flat at the intact model).
SCORE_NOISE = 1e-6


def importance_from_scores(head_scores: Any, shape: tuple[int, int] | None = None) -> Array:
    """Head importance I [L, H] = 1 + 9 (delta - min) / (max - min) over all heads, in [1, 10].

    head_scores: HeadScores-like (`.delta` [L, H], `.baseline` [U] when it has one) or an [L, H]
    array. All scores equal -> I = 1. shape: the expected (L, H), checked when given. NaN scores,
    and scores that differ but are all indistinguishable from zero (|delta| <= SCORE_NOISE x
    max(1, |baseline|): min-max scaling would stretch float noise over 1-10), raise ValueError.
    """
    d = head_delta(head_scores)
    if d.ndim != 2 or (shape is not None and d.shape != tuple(shape)):
        want = f"[L, H] = {list(shape)}" if shape is not None else "[L, H]"
        raise ValueError(f"head scores have shape {list(d.shape)}, expected {want}")
    if np.isnan(d).any():
        raise ValueError(f"head scores contain {int(np.isnan(d).sum())} NaN value(s)")
    if not np.isfinite(d).all():
        raise ValueError("head scores contain infinite values")
    lo, hi = d.min(), d.max()
    if hi == lo:
        return jnp.ones(d.shape, jnp.float32)
    baseline = getattr(head_scores, "baseline", None)
    scale = max(1.0, float(np.abs(np.asarray(baseline, np.float64)).max())) if baseline is not None else 1.0
    if np.abs(d).max() <= SCORE_NOISE * scale:
        raise ValueError(
            f"head scores are indistinguishable from zero (max |delta| = {np.abs(d).max():.3g}, "
            f"below {SCORE_NOISE:g} x the loss scale {scale:.3g}): CAP's min-max scaling would stretch "
            "float noise over importance 1-10; rescore with method=ablation (gradient scores of kl are "
            "always zero)"
        )
    return jnp.asarray(1.0 + 9.0 * (d - lo) / (hi - lo), jnp.float32)


def kv_importance(importance: Array, num_kv_heads: int, kv_rule: str = "mean") -> Array:
    """[L, K]: `kv_rule` over the G query heads h = k * G + g that read kv head k."""
    if kv_rule not in KV_RULES:
        raise ValueError(f"unknown kv_rule {kv_rule!r}: use one of {', '.join(KV_RULES)}")
    L, H = importance.shape
    grouped = importance.reshape(L, num_kv_heads, H // num_kv_heads)
    return grouped.mean(-1) if kv_rule == "mean" else grouped.max(-1)


def head_factor(values: Array, ndim: int, head_axis: int | None) -> Array:
    """values [L, H] or [L, K] (one per layer and head) shaped to broadcast against a stacked kernel with
    `ndim` axes whose heads are on `head_axis`."""
    if head_axis is None:
        raise ValueError("head_factor needs the kernel's head_axis (a head-structured family Kernel)")
    shape = [1] * ndim
    shape[0], shape[head_axis] = values.shape
    return values.reshape(shape)


def region_factors(
    importance: Array,
    num_kv_heads: int,
    kv_rule: str = "mean",
    family: Family = DEFAULT,
    ndims: dict[str, int] | None = None,
) -> dict[str, Array]:
    """Per-kernel importance factors, each broadcastable to its stacked kernel [L, ...].

    ndims: path -> the stacked kernel's number of axes (default: 1 + n_in + 2 for head kernels,
    i.e. heads and D on the output side or input side, and 3 for the others)."""
    I = jnp.asarray(importance, jnp.float32)
    by_heads = {"query": I, "kv": kv_importance(I, num_kv_heads, kv_rule)}
    layer = I.mean(-1)
    out = {}
    for k in family.kernels:
        n = (ndims or {}).get(k.path, 4 if k.heads else 3)
        out[k.path] = (
            head_factor(by_heads[k.heads], n, k.head_axis) if k.heads else layer.reshape((-1,) + (1,) * (n - 1))
        )
    return out


@jax.jit
def _scaled_abs(w: Array, f: Array) -> Array:
    return jnp.abs(w).astype(jnp.float32) * f


def weight_scores(
    params: Params, importance: Array, kv_rule: str = "mean", family: Family = DEFAULT
) -> dict[str, Array]:
    """S = |W| * I(region) for every prunable kernel (float32), keyed by path.

    importance: I [L, H] (see `importance_from_scores`); H and K are read from the kernels' head
    axes named by the family spec.
    """
    kernels = get_kernels(params, family)
    q, kv = family.head_kernels("query")[0], family.head_kernels("kv")[0]
    assert q.head_axis is not None and kv.head_axis is not None  # head kernels name their head axis
    L, H = kernels[q.path].shape[0], kernels[q.path].shape[q.head_axis]
    K = kernels[kv.path].shape[kv.head_axis]
    if tuple(importance.shape) != (L, H):
        raise ValueError(f"importance has shape {list(importance.shape)}, expected [L, H] = [{L}, {H}]")
    factors = region_factors(importance, K, kv_rule, family, {p: w.ndim for p, w in kernels.items()})
    return {p: _scaled_abs(w, factors[p]) for p, w in kernels.items()}
