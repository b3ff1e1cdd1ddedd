"""Sparse LoRA: rank-r adapters on the seven projections whose update is masked, so the merged
kernel is exactly as sparse as the mask.

Legend: L layers, I a kernel's input size (E, or H D for o_proj, F for down_proj), O its output
size, r the rank.

For a kernel W [L, in..., out...] (its [L, I, O] view is the transpose of HF's [out, in] weight)
the adapters are a [L, I, r] and b [L, r, O] and the effective kernel is

    W' = mask * (W + (alpha / r) (a b).reshape(W.shape))

(HF's weight + (alpha / r) B A with B = b^T, A = a^T, then masked). b starts at zero, so W' = W
(pruned) before the first step; `merge_lora` returns W' as the plain params, zeros where the
mask is 0, bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.pruning.importance import PRUNABLE, get_path

Params = dict[str, Any]
Adapters = dict[str, dict[str, jax.Array]]


class LoRARankError(ValueError):
    """A LoRA rank larger than a matrix allows."""


def kernel_dims(shape: tuple[int, ...], path: str, stacked: bool = True) -> tuple[int, int]:
    """(I, O) of a kernel of `shape` at `path`."""
    lead = 1 if stacked else 0
    n_in = PRUNABLE[path]
    return int(np.prod(shape[lead : lead + n_in])), int(np.prod(shape[lead + n_in :]))


def check_rank(params: Params, rank: int) -> None:
    """Raises LoRARankError when rank > min(I, O) of any of the seven kernels."""
    for p in PRUNABLE:
        i, o = kernel_dims(get_path(params, p).shape, p)
        if rank > min(i, o):
            raise LoRARankError(
                f"recovery.rank={rank} is larger than {p} allows ([{i}, {o}] per layer: "
                f"rank <= {min(i, o)}); choose a smaller rank"
            )


def init_lora(params: Params, rank: int, key: jax.Array) -> Adapters:
    """{path: {"a": [L, I, r] normal(0, 1 / sqrt(I)), "b": [L, r, O] zeros}} in float32."""
    check_rank(params, rank)
    out = {}
    for j, p in enumerate(PRUNABLE):
        w = get_path(params, p)
        i, o = kernel_dims(w.shape, p)
        a = jax.random.normal(jax.random.fold_in(key, j), (w.shape[0], i, rank), jnp.float32) / np.sqrt(i)
        out[p] = {"a": a, "b": jnp.zeros((w.shape[0], rank, o), jnp.float32)}
    return out


def lora_kernel(w: jax.Array, mask: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """mask * (w + scale * (a @ b).reshape(w.shape)) in w's dtype; stacked [L, ...] or one layer's."""
    delta = jnp.matmul(a, b).reshape(w.shape)
    merged = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return jnp.where(mask, merged, jnp.zeros((), w.dtype))


def set_path(tree: Params, path: str, value: Any) -> Params:
    """A copy of nested dict `tree` with `value` at '/'-joined `path` (other subtrees shared)."""
    head, _, rest = path.partition("/")
    return {**tree, head: set_path(tree[head], rest, value) if rest else value}


def merge_lora(params: Params, adapters: Adapters, masks: Params, scale: float) -> Params:
    """The plain params with every adapted kernel replaced by its masked effective kernel."""
    out = params
    for p, ab in adapters.items():
        out = set_path(out, p, lora_kernel(get_path(params, p), get_path(masks, p), ab["a"], ab["b"], scale))
    return out


def merge_layer(layer_p: Params, adapters_l: Adapters, masks_l: dict[str, jax.Array], scale: float) -> Params:
    """`merge_lora` for one layer's params slice (paths without the leading "layers/")."""
    out = layer_p
    for p, ab in adapters_l.items():
        sub = p.split("/", 1)[1]
        out = set_path(out, sub, lora_kernel(get_path(layer_p, sub), masks_l[p], ab["a"], ab["b"], scale))
    return out
