"""Head scores -> head importance -> per-weight scores (paper section 3.3), and the prunable layout.

Legend: L layers, H query heads, K kv heads, G = H // K, D head dim, E hidden, F MLP width.

Prunable weights are the seven projection kernels of every layer, keyed by their '/'-joined path
in the params tree (see `capjax.model`):

    layers/self_attn/q_proj/kernel  [L, E, H, D]   region factor: its own head's I
    layers/self_attn/k_proj/kernel  [L, E, K, D]   kv_rule (mean | max) over the G heads sharing it
    layers/self_attn/v_proj/kernel  [L, E, K, D]   same as k
    layers/self_attn/o_proj/kernel  [L, H, D, E]   its own head's I
    layers/mlp/gate_proj/kernel     [L, E, F]      the layer's mean head I
    layers/mlp/up_proj/kernel       [L, E, F]      same
    layers/mlp/down_proj/kernel     [L, F, E]      same

Embeddings, lm_head, norms and biases are never pruned. In HF's [out, in] view a kernel's input
axes are the ones right after L (E for q/k/v/gate/up, (H, D) for o, F for down).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Any]

# path -> number of input axes after the layer axis
PRUNABLE: dict[str, int] = {
    "layers/self_attn/q_proj/kernel": 1,
    "layers/self_attn/k_proj/kernel": 1,
    "layers/self_attn/v_proj/kernel": 1,
    "layers/self_attn/o_proj/kernel": 2,
    "layers/mlp/gate_proj/kernel": 1,
    "layers/mlp/up_proj/kernel": 1,
    "layers/mlp/down_proj/kernel": 1,
}
KV_RULES = ("mean", "max")


def get_path(tree: Params, path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def get_kernels(params: Params) -> dict[str, Array]:
    """The seven stacked prunable kernels, keyed by path."""
    return {p: get_path(params, p) for p in PRUNABLE}


def rows_view(kernel: Array, path: str, stacked: bool = True) -> Array:
    """A stacked kernel [L, in..., out...] as [L, in, out] (or one layer's [in..., out...] as
    [in, out] with stacked=False): the transpose of HF's [out, in] weight."""
    lead = kernel.shape[:1] if stacked else ()
    ins = kernel.shape[len(lead):len(lead) + PRUNABLE[path]]
    return kernel.reshape(*lead, int(np.prod(ins)), -1)


def head_delta(head_scores: Any) -> np.ndarray:
    """delta [L, H] from a HeadScores-like object (`.delta`) or an array; float64 numpy."""
    delta = getattr(head_scores, "delta", head_scores)
    if delta is None:
        raise ValueError("head scores have no delta")
    return np.asarray(jax.device_get(delta), dtype=np.float64)


def importance_from_scores(head_scores: Any, shape: tuple[int, int] | None = None) -> Array:
    """Head importance I [L, H] = 1 + 9 (delta - min) / (max - min) over all heads, in [1, 10].

    head_scores: HeadScores-like (`.delta` [L, H]) or an [L, H] array. All scores equal -> I = 1.
    shape: the expected (L, H), checked when given. NaN scores raise ValueError.
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
    return jnp.asarray(1.0 + 9.0 * (d - lo) / (hi - lo), jnp.float32)


def kv_importance(importance: Array, num_kv_heads: int, kv_rule: str = "mean") -> Array:
    """[L, K]: `kv_rule` over the G query heads h = k * G + g that read kv head k."""
    if kv_rule not in KV_RULES:
        raise ValueError(f"unknown kv_rule {kv_rule!r}: use one of {', '.join(KV_RULES)}")
    L, H = importance.shape
    grouped = importance.reshape(L, num_kv_heads, H // num_kv_heads)
    return grouped.mean(-1) if kv_rule == "mean" else grouped.max(-1)


def region_factors(importance: Array, num_kv_heads: int, kv_rule: str = "mean") -> dict[str, Array]:
    """Per-kernel importance factors, each broadcastable to its stacked kernel [L, ...]."""
    I = jnp.asarray(importance, jnp.float32)
    kv = kv_importance(I, num_kv_heads, kv_rule)
    layer = I.mean(-1)[:, None, None]
    return {
        "layers/self_attn/q_proj/kernel": I[:, None, :, None],
        "layers/self_attn/k_proj/kernel": kv[:, None, :, None],
        "layers/self_attn/v_proj/kernel": kv[:, None, :, None],
        "layers/self_attn/o_proj/kernel": I[:, :, None, None],
        "layers/mlp/gate_proj/kernel": layer,
        "layers/mlp/up_proj/kernel": layer,
        "layers/mlp/down_proj/kernel": layer,
    }


@jax.jit
def _scaled_abs(w: Array, f: Array) -> Array:
    return jnp.abs(w).astype(jnp.float32) * f


def weight_scores(params: Params, importance: Array, kv_rule: str = "mean") -> dict[str, Array]:
    """S = |W| * I(region) for every prunable kernel (float32), keyed by path.

    importance: I [L, H] (see `importance_from_scores`); K is read from the k_proj kernel.
    """
    kernels = get_kernels(params)
    L, _, H, _ = kernels["layers/self_attn/q_proj/kernel"].shape
    K = kernels["layers/self_attn/k_proj/kernel"].shape[2]
    if tuple(importance.shape) != (L, H):
        raise ValueError(f"importance has shape {list(importance.shape)}, expected [L, H] = [{L}, {H}]")
    factors = region_factors(importance, K, kv_rule)
    return {p: _scaled_abs(w, factors[p]) for p, w in kernels.items()}
