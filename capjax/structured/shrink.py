"""Shrink: params + ModelConfig -> the smaller params + ModelConfig a `Plan` describes.

Legend: L layers, E hidden, H query heads, K kv heads, D head dim (kept), F MLP width.
Primes are the kept counts. Every stacked [L, ...] leaf keeps the plan's layers; then

    self_attn/q_proj/kernel [L', E, H, D] -> [L', E, H', D]    (bias [L', H, D] -> [L', H', D])
    self_attn/k_proj, v_proj [L', E, K, D] -> [L', E, K', D]    (bias [L', K, D] -> [L', K', D])
    self_attn/o_proj/kernel [L', H, D, E] -> [L', H', D, E]
    mlp/gate_proj, up_proj  [L', E, F]    -> [L', E, F']
    mlp/down_proj/kernel    [L', F, E]    -> [L', F', E]

Norms (q/k norms are per head_dim, shared by heads), embeddings and the LM head are unchanged.
The result computes what the dense model computes with the removed heads zeroed before o_proj,
the removed channels zeroed before down_proj and the removed layers skipped
(`capjax.structured.mask.masked_logits`), and is an ordinary model: `capjax.save_pretrained`
writes it as a standard HF folder.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from capjax.families import family_of
from capjax.model import Decoder
from capjax.structured.plan import Plan

Params = dict[str, Any]

# Stacked [L, ...] leaves indexed by channels (F), beyond the head kernels the family lists: path -> axis.
CHANNEL_AXES = {"layers/mlp/gate_proj/kernel": 2, "layers/mlp/up_proj/kernel": 2, "layers/mlp/down_proj/kernel": 1}
BIAS_HEADS = {
    "layers/self_attn/q_proj/bias": "query",
    "layers/self_attn/k_proj/bias": "kv",
    "layers/self_attn/v_proj/bias": "kv",
}


def _take(a: jax.Array, idx, axis: int) -> jax.Array:
    """a [L', ...] with per-layer indices idx [L', n] gathered along `axis`."""
    shape = [1] * a.ndim
    shape[0], shape[axis] = idx.shape
    return jnp.take_along_axis(a, jnp.asarray(idx).reshape(shape), axis=axis)


def axis_table(config) -> dict[str, tuple[str, int]]:
    """path -> (what indexes the axis: "query" | "kv" | "channel", axis of the stacked leaf)."""
    table = {k.path: (k.heads, k.head_axis) for k in family_of(config).kernels if k.heads and k.head_axis is not None}
    table.update({p: ("channel", axis) for p, axis in CHANNEL_AXES.items()})
    table.update({p: (heads, 1) for p, heads in BIAS_HEADS.items()})
    return table


def shrink_params(config, params: Params, plan: Plan) -> Params:
    """The smaller params tree (see the module docstring); every other leaf is the same array."""
    plan.validate(config)
    index = {"query": plan.heads, "kv": plan.kv_heads, "channel": plan.channels}
    table = axis_table(config)
    layers = jnp.asarray(plan.layers)

    def leaf(path, a):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if not name.startswith("layers/"):
            return a
        a = jnp.take(a, layers, axis=0)
        if name in table:
            what, axis = table[name]
            a = _take(a, index[what], axis)
        return a

    return jax.tree_util.tree_map_with_path(leaf, params)


def shrink(model: Decoder, params: Params, plan: Plan) -> tuple[Decoder, Params]:
    """(the smaller Decoder, its params): same family, dtype and head_dim."""
    small = plan.config(model.config)
    return Decoder(small, dtype=model.dtype), shrink_params(model.config, params, plan)
