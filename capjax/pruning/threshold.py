"""Exact-count thresholds over score arrays and pytrees, by bisection on the value (no sort).

Scores are compared through an order-preserving int32 key (the float32 bit pattern with the
negative half flipped), so a bisection over keys finds the k-th smallest score in at most 33
counting passes, each a jitted reduction. Nothing is sorted or concatenated: the global
threshold scales to billions of weights and works unchanged on sharded arrays.

Every mask here is a keep mask (True = kept, as `capjax.prune` returns and as jaxpruner does):
the functions name the scores they drop.

Tie rule (everywhere in this module): when the k-th smallest score is tied, every score strictly
below it is pruned and the tied ones are pruned in flat (C) index order until exactly k are
pruned. For a pytree the leaves are taken in `jax.tree.leaves` order, so the tied weights of an
earlier leaf go first. Within one row this equals a stable sort (Wanda's `torch.sort(stable=True)`).

Counts are per row of each leaf ([rows] int32, a row being a leaf's leading-axis slice) and
summed on the host in int64, so each layer slice must hold fewer than 2**31 elements.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_FLIP = 0x7FFFFFFF
_ITERS = 33  # keys span at most 2**32 values


def order_key(x: Array) -> Array:
    """int32 key with key(a) < key(b) iff a < b for float32 a, b (exact for bf16/f16 too; -0 == +0)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(_FLIP), bits)


def key_to_value(key: int) -> float:
    """The float32 whose `order_key` is `key`."""
    bits = key ^ _FLIP if key < 0 else key
    return float(np.array(bits, np.int32).view(np.float32))


def _mid(lo: Array, hi: Array) -> Array:
    """floor((lo + hi) / 2) without int32 overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def _rows(x: Array) -> Array:
    return x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)


# ---------------------------------------------------------------------------- along the last axis
@jax.jit
def _kth_key_last(key: Array, k: Array) -> Array:
    """Smallest t [...] with count(key[..., :] <= t) >= k, per group of the last axis; k in [1, n]."""
    lo = key.min(-1) - 1
    hi = key.max(-1)

    def body(_, c):
        lo, hi = c
        mid = _mid(lo, hi)
        ok = jnp.sum(key <= mid[..., None], axis=-1) >= k
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, _ITERS, body, (lo, hi))[1]


@jax.jit
def _keep_all_but_lowest_last(scores: Array, k: Array) -> Array:
    key = order_key(scores)
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), key.shape[:-1])
    t = _kth_key_last(key, jnp.maximum(k, 1))[..., None]
    above = key > t
    tied = key == t
    need = (k - jnp.sum(key < t, axis=-1))[..., None]
    rank = jnp.cumsum(tied, axis=-1, dtype=jnp.int32)
    return above | (tied & (rank > need)) | (k[..., None] <= 0)


@jax.jit
def _keep_all_but_lowest_sorted(scores: Array, k: Array) -> Array:
    s = scores.astype(jnp.float32)
    order = jnp.argsort(jnp.where(s == 0, jnp.float32(0), s), axis=-1, stable=True)  # -0 ties +0
    rank = jnp.argsort(order, axis=-1)
    return rank >= jnp.asarray(k, jnp.int32)[..., None]


SORT_MAX = 1 << 16  # groups up to this size are ranked by a stable sort, larger ones by bisection


def keep_all_but_lowest(scores: Array, k: int | Array, method: str = "auto") -> Array:
    """Keep mask (True = kept) dropping exactly the k lowest scores of each group along the last axis.

    scores [..., n]; k an int or an int array broadcastable to [...], 0 <= k <= n.
    Ties: tied scores are pruned in index order (a stable sort's order).
    method: "sort" (stable argsort ranks), "bisect" (no sort: 33 counting passes) or "auto"
    (sort when n <= SORT_MAX); both give the same mask.
    """
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), scores.shape[:-1])
    if method == "sort" or (method == "auto" and scores.shape[-1] <= SORT_MAX):
        return _keep_all_but_lowest_sorted(scores, k)
    return _keep_all_but_lowest_last(scores, k)


@jax.jit
def _keep_above_kth_last(scores: Array, k: Array) -> Array:
    key = order_key(scores)
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), key.shape[:-1])
    t = _kth_key_last(key, jnp.maximum(k, 1))[..., None]
    return (key > t) | (k[..., None] <= 0)


def keep_above_kth(scores: Array, k: int | Array) -> Array:
    """Keep mask of every score > the k-th smallest of its group (last axis): the scores <= it,
    ties included, are dropped.

    This is the reference rule `W_metric <= sort(W_metric)[k - 1]` (pruned) of Wanda's
    prune_magnitude and SparseGPT's block mask: at least k are pruned, more when the k-th score is
    tied. k = 0 keeps everything.
    """
    return _keep_above_kth_last(scores, jnp.asarray(k, jnp.int32))


# ---------------------------------------------------------------------------- over a pytree
@jax.jit
def count_at_or_below(scores: Any, t: Array) -> list[Array]:
    """Per leaf, how many scores have order key <= t, counted per leading row ([rows] int32)."""
    # Reduces over the trailing axes in place (no reshape), so a sharded leaf is counted shard by
    # shard and only the [rows] partial counts are combined: no weight is gathered.
    return [
        jnp.sum(order_key(s) <= t, axis=tuple(range(1, s.ndim)), dtype=jnp.int32)
        if s.ndim > 1
        else jnp.sum(order_key(s) <= t, dtype=jnp.int32)[None]
        for s in jax.tree.leaves(scores)
    ]


@jax.jit
def _key_range(scores: Any) -> tuple[Array, Array]:
    keys = [order_key(s) for s in jax.tree.leaves(scores)]
    return jnp.min(jnp.stack([k.min() for k in keys])), jnp.max(jnp.stack([k.max() for k in keys]))


def _count(scores: Any, t: int) -> list[int]:
    """Per-leaf count of scores with key <= t (host ints)."""
    return [int(np.asarray(c, np.int64).sum()) for c in count_at_or_below(scores, jnp.int32(t))]


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A global threshold: prune every score below `value` and `n_prune - n_below` of the
    `n_tied` scores equal to it (tie rule in the module docstring).

    key: `order_key` of the threshold; n_total: number of scores; leaf_tied / leaf_take: per leaf
    (in `jax.tree.leaves` order) the number of scores equal to the threshold and how many of them
    are pruned.
    """

    key: int
    value: float
    n_prune: int
    n_below: int
    n_tied: int
    n_total: int
    leaf_tied: tuple[int, ...]
    leaf_take: tuple[int, ...]

    @property
    def fraction(self) -> float:
        return self.n_prune / max(self.n_total, 1)


def global_threshold(scores: Any, sparsity: float) -> Threshold:
    """The threshold pruning exactly round(sparsity * n) of all scores in the pytree `scores`.

    Bisection on the key: each step is one jitted count of `score <= t` over every leaf.
    """
    leaves = jax.tree.leaves(scores)
    n_total = sum(int(np.prod(s.shape)) for s in leaves)
    k = int(round(sparsity * n_total))
    if k == 0 or n_total == 0:
        zeros = tuple(0 for _ in leaves)
        return Threshold(-(2**31), float("-inf"), 0, 0, 0, n_total, zeros, zeros)
    kmin, kmax = (int(v) for v in _key_range(scores))
    lo, hi = kmin - 1, kmax  # invariant: count(<= lo) < k <= count(<= hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(_count(scores, mid)) >= k:
            hi = mid
        else:
            lo = mid
    at, below = _count(scores, hi), _count(scores, hi - 1)
    tied = [a - b for a, b in zip(at, below)]
    need = k - sum(below)
    take = []
    for n in tied:
        take.append(min(need, n))
        need -= take[-1]
    return Threshold(hi, key_to_value(hi), k, sum(below), sum(tied), n_total, tuple(tied), tuple(take))


@jax.jit
def _keep_at_least(s: Array, t: Array) -> Array:
    return order_key(s) >= t


@jax.jit
def _keep_above(s: Array, t: Array) -> Array:
    return order_key(s) > t


@jax.jit
def _keep_with_ties(s: Array, t: Array, take: Array) -> Array:
    key = order_key(s)
    tied = key == t
    rank = jnp.cumsum(tied.reshape(-1), dtype=jnp.int32).reshape(s.shape)
    return (key > t) | (tied & (rank > take))


def keep_by_threshold(scores: Any, threshold: Threshold) -> Any:
    """Keep masks (True = kept) of `scores` under `threshold`, a pytree like `scores`.

    Only a leaf whose tied scores are partly pruned pays for a cumulative count.
    """
    leaves, treedef = jax.tree.flatten(scores)
    t = jnp.int32(threshold.key)
    out = []
    for s, take, tied in zip(leaves, threshold.leaf_take, threshold.leaf_tied):
        if threshold.n_prune == 0:
            out.append(jnp.ones(s.shape, bool))
        elif take == tied:
            out.append(_keep_above(s, t))
        elif take == 0:
            out.append(_keep_at_least(s, t))
        else:
            out.append(_keep_with_ties(s, t, jnp.int32(take)))
    return jax.tree.unflatten(treedef, out)


def keep_global(scores: Any, sparsity: float) -> Any:
    """Keep masks dropping exactly the round(sparsity * n) lowest scores over the whole pytree."""
    return keep_by_threshold(scores, global_threshold(scores, sparsity))


def keep_per_matrix(scores: Any, sparsity: float) -> Any:
    """Per-matrix thresholds: keep masks that, in every leaf [L, ...], drop exactly
    round(sparsity * n) of each layer slice (n = its size; same tie rule, within the slice)."""

    def one(s):
        rows = _rows(s)
        return keep_all_but_lowest(rows, int(round(sparsity * rows.shape[1]))).reshape(s.shape)

    return jax.tree.map(one, scores)
