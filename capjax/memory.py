"""Memory: whether a model's params fit before loading them, how many ablations to evaluate at
once, and an out-of-memory fallback.

Legend: B calibration sequences, T tokens per sequence (S = T keys), A answer tokens, E hidden,
F MLP width, H query heads, K kv heads, D head dim, V vocab, c the compute dtype's bytes.

Per ablation (one vmapped mask), layers run one at a time under `lax.scan`, so the live
activations are one layer's or the LM head's, whichever is larger:

    layer   = B T [ c (4 E + 2 (H + K) D + W F) + (4 + 4 + c) H S ]
              residual in/out, normed input and o_proj output (4 E); q, k, v, attention
              output (2 (H + K) D); W F-wide MLP activations, W = the family's
              `mlp_width_activations` (SwiGLU: gate, up and silu(gate) * up, 3); float32 attention
              logits, float32 softmax and its cast (H S each)
    lm_head = A V' (4 + 4)           float32 logits and their exp at the A answer tokens, where
                                     V' = V for full logits (the answer_only=False reference) and
                                     V' = min(V, vocab_chunk) for the fast paths, whose
                                     `capjax.model.token_nll` holds one vocabulary chunk at a time
    per_ablation = max(layer, lm_head)

    chunk = clamp(floor(budget / per_ablation), 1, max_chunk)

The budget is what the device has free *after* the params were placed on it, so params are
not counted (they are already in `bytes_in_use`): on accelerators 75% of
memory_stats()["bytes_limit"] - ["bytes_in_use"] (the rest is XLA's scratch and fragmentation
headroom); on CPU (memory_stats() is None) half of psutil's available RAM, capped at
`HOST_BUDGET` since the host is shared; `DEFAULT_BUDGET` when neither is known. On CPU the
default chunk is further capped at `CPU_CHUNK_BYTES` of activations: a CPU has nothing to gain
from a wider vmap (the weights are already reused across all B T tokens), and a chunk that spills
out of the last-level cache runs slower (`scripts/bench_chunk.py`).

Example: Llama-3-8B (E 4096, F 14336, H 32, K 8, D 128, V 128256) in bfloat16, B 128, T 256,
A = B T / 4, vocab chunk 4096: layer = 7.2 GB, lm_head = 0.27 GB (8.4 GB with full logits) per
ablation; one 141 GB H200 holding the 16 GB of params has ~94 GB of budget -> chunk 12; an 80 GB
H100 -> chunk 6.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from capjax.errors import InsufficientMemoryError
from capjax.families import family_of
from capjax.model import param_shapes

R = TypeVar("R")
DEFAULT_BUDGET = 2 << 30
HOST_BUDGET = 4 << 30
ACCELERATOR_FRACTION = 0.75
CPU_CHUNK_BYTES = 64 << 20
_OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OOM when allocating|failed to allocate", re.IGNORECASE)


def host_available_bytes() -> int | None:
    """psutil's available host RAM, or None when psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def device_free_bytes(device: Any) -> int | None:
    """bytes_limit - bytes_in_use of an accelerator; None where memory_stats() has no limit (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None


def available_bytes(device: Any = None) -> int:
    """The activation budget of `device` (default the first local one), per the module docstring."""
    free = device_free_bytes(device or jax.local_devices()[0])
    if free is not None:
        return max(0, int(ACCELERATOR_FRACTION * free))
    host = host_available_bytes()
    return DEFAULT_BUDGET if host is None else int(min(host // 2, HOST_BUDGET))


def params_bytes(config: Any, dtype: Any) -> tuple[int, int]:
    """(total, largest leaf) bytes of the params tree in `dtype`, from its shapes alone."""
    sizes = [int(leaf.size) * jnp.dtype(dtype).itemsize for leaf in jax.tree.leaves(param_shapes(config))]
    return sum(sizes), max(sizes)


def sharded_params_bytes(config: Any, dtype: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> int:
    """Bytes of the params one device of `mesh` holds when they are sharded by `rules` (default
    `capjax.sharding.DEFAULT_RULES`): each leaf's shard, replicated leaves whole."""
    from capjax import sharding

    shapes = param_shapes(config)
    shardings = sharding.param_shardings(shapes, mesh, sharding.DEFAULT_RULES if rules is None else rules)
    return (
        sum(
            math.prod(s.shard_shape(leaf.shape)) for leaf, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings))
        )
        * jnp.dtype(dtype).itemsize
    )


def check_params_fit(
    config: Any,
    dtype: Any,
    device: Any = None,
    host_bytes: int | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> None:
    """Raises InsufficientMemoryError when the params of `config` in `dtype` cannot be loaded.

    The loader stages one stacked [L, ...] leaf in host RAM, then places it on `device` (default
    the first local one), or, with a `mesh`, its shards on the mesh's devices (each device then
    needs `sharded_params_bytes`). On CPU, host and device are the same memory: the params this
    process's devices hold + the largest leaf must fit in the available RAM. On an accelerator,
    a device's params must fit in its free memory and the largest leaf in host RAM. `host_bytes`
    overrides psutil's figure (for tests); CAPJAX_SKIP_MEMORY_CHECK=1 skips the check.
    """
    if os.environ.get("CAPJAX_SKIP_MEMORY_CHECK") == "1":
        return
    total, largest = params_bytes(config, dtype)
    if mesh is None:
        device = device or jax.local_devices()[0]
        per_device, local, what = total, 1, "its params"
    else:
        device = device or mesh.local_devices[0]
        per_device, local = sharded_params_bytes(config, dtype, mesh, rules), len(mesh.local_devices)
        what = f"its params sharded over {mesh.devices.size} devices"
    host = host_available_bytes() if host_bytes is None else host_bytes
    free = device_free_bytes(device)
    checks = []
    if free is not None:
        checks.append((per_device, free, f"{device.platform} device {device.id}", what))
        if host is not None:
            checks.append((largest, host, "host RAM", "its largest stacked tensor (staged on the host)"))
    elif host is not None:
        checks.append(
            (
                local * per_device + largest,
                host,
                "host RAM",
                f"{what} plus the largest stacked tensor (staged while loading)",
            )
        )
    name = jnp.dtype(dtype).name
    for need, have, where, what in checks:
        if need > have:
            hint = (
                "load it in bfloat16 (`--dtype bfloat16`, or `dtype: bfloat16` in a config), which halves it, "
                if name != "bfloat16"
                else ""
            )
            raise InsufficientMemoryError(
                f"not enough memory to load this model: {what} need {need / 2**30:.2f} GiB in {name} "
                f"({total / jnp.dtype(dtype).itemsize / 1e6:,.0f} M params), but {where} has "
                f"{have / 2**30:.2f} GiB free. Fix: {hint}free memory, or use a machine with more; "
                "CAPJAX_SKIP_MEMORY_CHECK=1 skips this check"
            )


def ablation_bytes(
    config: Any,
    batch: int,
    seq_len: int,
    dtype: Any = jnp.float32,
    answer_tokens: int | None = None,
    vocab_chunk: int | None = None,
) -> int:
    """Live activation bytes of one ablation (formula in the module docstring).

    answer_tokens: A, the tokens the LM head runs on (default B * T, an upper bound).
    vocab_chunk: the LM head's vocabulary chunk (default None: full [A, V] logits).
    """
    c = jnp.dtype(dtype).itemsize
    E, F, H, K, D, V = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size,
    )
    A = batch * seq_len if answer_tokens is None else answer_tokens
    W = family_of(config).mlp_width_activations
    layer = batch * seq_len * (c * (4 * E + 2 * (H + K) * D + W * F) + (8 + c) * H * seq_len)
    lm_head = A * (V if vocab_chunk is None else min(V, vocab_chunk)) * 8
    return int(max(layer, lm_head))


def chunk_size_for_memory(
    config: Any,
    batch: int,
    seq_len: int,
    dtype: Any = jnp.float32,
    budget_bytes: float | None = None,
    answer_tokens: int | None = None,
    max_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> int:
    """Ablations per device per step so that their activations fit in `budget_bytes` (default
    `available_bytes()`, at most `CPU_CHUNK_BYTES` on CPU); at least 1, at most `max_chunk`
    (default L * H)."""
    budget = budget_bytes
    if budget is None:
        budget = available_bytes()
        if jax.local_devices()[0].platform == "cpu":
            budget = min(budget, CPU_CHUNK_BYTES)
    per = ablation_bytes(config, batch, seq_len, dtype, answer_tokens, vocab_chunk)
    cap = config.num_layers * config.num_heads if max_chunk is None else max_chunk
    return int(max(1, min(cap, budget // per)))


def is_oom(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error from XLA (or Python's MemoryError)."""
    return isinstance(error, MemoryError) or (isinstance(error, Exception) and bool(_OOM.search(str(error))))


def run_with_oom_fallback(fn: Callable[[int], R], chunk: int) -> R:
    """fn(chunk), retried with chunk // 2 after each out-of-memory error, down to chunk 1.

    `fn` must block until its result is computed (e.g. return numpy arrays): JAX dispatch is
    asynchronous and an allocation failure surfaces only when the result is read.
    Other errors, and an OOM at chunk 1, propagate.
    """
    chunk = max(1, int(chunk))
    while True:
        try:
            return fn(chunk)
        except Exception as e:  # noqa: BLE001 - filtered by is_oom
            if chunk <= 1 or not is_oom(e):
                raise
            warnings.warn(f"out of memory at chunk={chunk}; retrying with {chunk // 2}", RuntimeWarning, stacklevel=2)
            chunk //= 2


__all__ = [
    "InsufficientMemoryError",
    "ablation_bytes",
    "available_bytes",
    "check_params_fit",
    "chunk_size_for_memory",
    "device_free_bytes",
    "host_available_bytes",
    "is_oom",
    "params_bytes",
    "run_with_oom_fallback",
    "sharded_params_bytes",
]
