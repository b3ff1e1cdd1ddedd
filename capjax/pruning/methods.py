"""Pruning methods. Each returns (new kernels, keep masks) over the seven prunable kernels;
every mask is True = kept (as `capjax.prune` returns and as jaxpruner does).

Legend: L layers, H query heads, K kv heads, G = H // K, B calibration sequences, T time,
n_in / n_out a matrix's input / output width (HF's [out, in] weight is `rows_view(kernel).T`).

    magnitude   |W|; scope "matrix" (default): per layer slice of each kernel, Wanda's
                prune_magnitude rule (prune |W| <= sort(|W|)[int(n * s)]: int(n s) + 1 weights
                plus ties); scope "global": exactly round(n s) over all prunable weights.
    random      uniform random scores (seed=; "rbg" PRNG, reproducible per backend), exactly
                round(n s) per layer slice.
    cap         S = |W| * I(region) (see `importance`); scope "global" (default) or "layer".
    cap_wanda   S = |W| * ||X_j|| * I(region); Wanda's per-output-row comparison group.
    cap_heads   structured: whole heads, lowest delta first (sparsity counts heads, see below).
    wanda       S = |W| * ||X_j||_2 over non-padding calibration tokens; per output row the
                int(n_in * s) lowest (stable-sort order) pruned; layers in order.
    sparsegpt   SparseGPT's fasterprune (OBS updates, blocks of `blocksize` columns, per-block
                mask `w^2 / d^2 <= sort(...)[int(numel * s)]`); layers in order.

Sequential methods (wanda, cap_wanda, sparsegpt) follow Wanda's prune_wanda / prune_sparsegpt:
for each layer, the inputs of all its projections (their input sites, `capjax.sites.PROJECTION_INPUT`)
are collected in one pass of the (already pruned) previous layers' outputs through the unpruned
layer, the layer is pruned, and it is run again to give the next layer its inputs. Both passes run
the one layer scan's layer function (`apply_layer`, with the sites captured through
`capjax.sites.Interventions`); the per-layer loop stays in Python because pruning a layer is
host-side work (SparseGPT's Cholesky retries).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.families import Family, family_of
from capjax.model import apply_layer, layer_context, layer_params
from capjax.pruning.importance import PRUNABLE, get_path, head_factor, region_factors, rows_view, weight_scores
from capjax.pruning.nm import keep_nm
from capjax.pruning.registry import METHODS, MethodSpec
from capjax.pruning.threshold import keep_above_kth, keep_all_but_lowest, keep_global, keep_per_matrix
from capjax.sites import PROJECTION_INPUT, Interventions

Array = jax.Array
Kernels = dict[str, Array]
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class Job:
    """Everything a method needs. importance: I [L, H] or None; tokens / attention_mask [B, T]."""

    model: Any
    params: dict
    kernels: Kernels
    sparsity: float
    nm: tuple[int, int] | None
    importance: Array | None
    delta: np.ndarray | None
    tokens: Array | np.ndarray | None
    attention_mask: Array | np.ndarray | None
    options: dict[str, Any]
    mesh: Any = None  # a jax Mesh: calibration chunks are split over its "data" axis
    loss_mask: Array | np.ndarray | None = None  # [B, T] calibration answer tokens, when the calibration has them

    @property
    def family(self) -> Family:
        return family_of(getattr(self.model, "config", None))

    @property
    def num_kv_heads(self) -> int:
        kv = self.family.head_kernels("kv")[0]
        assert kv.head_axis is not None  # head kernels name their head axis
        return self.kernels[kv.path].shape[kv.head_axis]


def _nm_masks(scores: Kernels, nm: tuple[int, int]) -> Kernels:
    return {p: keep_nm(rows_view(s, p), *nm).reshape(s.shape) for p, s in scores.items()}


# ---------------------------------------------------------------------------- one-shot methods
def magnitude(job: Job) -> tuple[Kernels, Kernels]:
    scores = {p: jnp.abs(w) for p, w in job.kernels.items()}
    if job.nm:
        return job.kernels, _nm_masks(scores, job.nm)
    if job.options["scope"] == "global":
        return job.kernels, keep_global(scores, job.sparsity)

    def per_matrix(s):
        rows = s.reshape(s.shape[0], -1)
        k = int(rows.shape[1] * job.sparsity) + 1 if job.sparsity > 0 else 0
        return keep_above_kth(rows, k).reshape(s.shape)

    return job.kernels, {p: per_matrix(s) for p, s in scores.items()}


@partial(jax.jit, static_argnames=("shapes",))
def _uniform_scores(key: Array, shapes: tuple[tuple[int, ...], ...]) -> list[Array]:
    return [jax.random.uniform(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)]


def _random_key(seed: int) -> Array:
    # XLA's RngBitGenerator compiles in a fraction of threefry's time; streams are reproducible
    # for a seed on a given backend (they may differ between CPU and GPU).
    return jax.random.key(seed, impl="rbg")


def random(job: Job) -> tuple[Kernels, Kernels]:
    shapes = tuple(tuple(w.shape) for w in job.kernels.values())
    scores = dict(zip(job.kernels, _uniform_scores(_random_key(job.options["seed"]), shapes)))
    if job.nm:
        return job.kernels, _nm_masks(scores, job.nm)
    return job.kernels, keep_per_matrix(scores, job.sparsity)


def cap(job: Job) -> tuple[Kernels, Kernels]:
    assert job.importance is not None  # prune() requires head scores for the cap family
    scores = weight_scores(job.params, job.importance, job.options["kv_rule"], job.family)
    if job.nm:
        return job.kernels, _nm_masks(scores, job.nm)
    if job.options["scope"] == "layer":
        return job.kernels, keep_per_matrix(scores, job.sparsity)
    return job.kernels, keep_global(scores, job.sparsity)


def heads_to_remove(delta: np.ndarray, sparsity: float) -> np.ndarray:
    """removed [L, H] bool: the ceil(sparsity * L * H) heads of lowest delta (ties: lower l*H + h
    first), i.e. the fewest heads whose removed fraction reaches `sparsity`."""
    n = math.ceil(sparsity * delta.size - 1e-9)
    order = np.argsort(delta.reshape(-1), kind="stable")[:n]
    removed = np.zeros(delta.size, bool)
    removed[order] = True
    return removed.reshape(delta.shape)


def cap_heads(job: Job) -> tuple[Kernels, Kernels]:
    """Structured CAP: `sparsity` is the fraction of the L * H attention heads removed (not of
    weights). A removed head loses its q columns [l, :, h, :] and o rows [l, h, :, :]; k / v of
    kv head k are removed only when all G heads of its group are. MLPs are untouched."""
    assert job.delta is not None  # prune() requires head scores for the cap family
    L, H = job.delta.shape
    K = job.num_kv_heads
    kept = jnp.asarray(~heads_to_remove(job.delta, job.sparsity))
    kv_kept = kept.reshape(L, K, H // K).any(-1)
    by_heads = {"query": kept, "kv": kv_kept}
    masks = {}
    for k in job.family.kernels:
        w = job.kernels[k.path]
        m = head_factor(by_heads[k.heads], w.ndim, k.head_axis) if k.heads else jnp.ones((1,) * w.ndim, bool)
        masks[k.path] = jnp.broadcast_to(m, w.shape)
    return job.kernels, masks


# ---------------------------------------------------------------------------- layer by layer
def heads_removed(config, masks) -> str:
    """cap_heads' summary: how many whole heads its masks remove."""
    o_proj = np.asarray(get_path(masks, "layers/self_attn/o_proj/kernel"))  # [L, H, D, E]
    removed = int(np.sum(~o_proj.any(axis=(2, 3))))
    return f"removed {removed} of {config.num_layers * config.num_heads} heads"


_STAT_SITES = frozenset(PROJECTION_INPUT.values())  # attn.in, attn.z, mlp.in, mlp.hidden


def _input_stats(model, kind: str, lp: dict, layer: Array, x: Array, ctx, w: Array) -> dict[str, Array]:
    """Statistics of every projection's input over real tokens (w [B, T] = attention mask), read
    from its input site (`capjax.sites.PROJECTION_INPUT`), captured by the layer function the one
    layer scan runs (`apply_layer`): kind "norm": sum of x_j^2 [n_in]; "hessian": sum of x x^T
    [n_in, n_in]. Each site is reduced once (q, k and v share attn.in; gate and up mlp.in)."""
    _, sites = apply_layer(model, lp, x, ctx, Interventions(capture=_STAT_SITES), layer=layer)
    per_site = {}
    for site in _STAT_SITES:
        a = sites[site]
        B, T = a.shape[:2]
        a = a.astype(jnp.float32).reshape(B * T, -1) * w.reshape(B * T, 1)
        per_site[site] = jnp.sum(a * a, axis=0) if kind == "norm" else jnp.matmul(a.T, a, precision=_HIGHEST)
    return {f"layers/{proj}/kernel": per_site[site] for proj, site in PROJECTION_INPUT.items()}


@partial(jax.jit, static_argnums=(0, 1))
def layer_stats(model, kind: str, lp: dict, xs: Array, ctxs, ws: Array, layer: Array | None = None) -> dict[str, Array]:
    """Input statistics summed over chunks: xs [C, B, T, E], ctxs / ws chunked alike; layer: lp's
    index (default 0; it matters only where sliding and global layers alternate)."""
    layer = jnp.int32(0) if layer is None else layer
    f = partial(_input_stats, model, kind, lp, layer)
    first = jax.tree.map(lambda a: a[0], (xs, ctxs, ws))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(f, *first))
    step = lambda acc, c: (jax.tree.map(jnp.add, acc, f(*c)), None)  # noqa: E731
    return jax.lax.scan(step, init, (xs, ctxs, ws))[0]


def _set_kernels(lp: dict, kernels: Kernels) -> dict:
    lp = jax.tree.map(lambda a: a, lp)  # copy the dict structure
    for p, w in kernels.items():
        _, group, name, _ = p.split("/")
        lp[group][name] = {**lp[group][name], "kernel": w}
    return lp


@partial(jax.jit, static_argnums=0)
def _layer_forward(model, lp: dict, layer: Array, new: Kernels, keep: Kernels, xs: Array, ctxs) -> Array:
    """The pruned layer (kernels `new`, zero where not `keep`) applied to every chunk of xs (by
    `apply_layer`, the layer function of the one layer scan)."""
    lp = _set_kernels(lp, {p: jnp.where(keep[p], v, jnp.zeros((), v.dtype)) for p, v in new.items()})
    return jax.lax.map(lambda c: apply_layer(model, lp, c[0], c[1], layer=layer), (xs, ctxs))


layer_slice = jax.jit(layer_params)
_stack_layers = jax.jit(lambda layers: jax.tree.map(lambda *a: jnp.stack(a), *layers))


def _sequential(job: Job, kind: str, prune_layer: Callable) -> tuple[Kernels, Kernels]:
    """Drives a layer-by-layer method. prune_layer(l, kernels_l, stats, n_tokens) ->
    (new kernels_l, keep masks_l), each keyed by path with one layer's shapes.

    Calibration sequences go through the layer `batch_size` at a time (padded with empty
    sequences, which carry no weight, to a whole number of chunks)."""
    model, params = job.model, job.params
    tokens, am = np.asarray(job.tokens), np.asarray(job.attention_mask)
    B = tokens.shape[0]
    bs = max(1, min(int(job.options["batch_size"]), B))
    pad = -B % bs
    tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), tokens.dtype)])
    am = np.concatenate([am, np.zeros((pad, am.shape[1]), am.dtype)])
    x, ctx = layer_context(model, params, jnp.asarray(tokens), jnp.asarray(am))
    chunk = lambda a: a.reshape(-1, bs, *a.shape[1:])  # noqa: E731
    xs, ctxs, ws = chunk(x), jax.tree.map(chunk, ctx), chunk(jnp.asarray(am, jnp.float32))
    if job.mesh is not None:
        from capjax.sharding import shard_batch

        xs, ctxs, ws = shard_batch((xs, ctxs, ws), job.mesh, axis=1)
    n_tokens = float(am.sum())
    new_layers, keep_layers = [], []
    for l in range(model.config.num_layers):
        lp = layer_slice(params, l)
        stats = layer_stats(model, kind, lp, xs, ctxs, ws, jnp.int32(l))
        kernels_l = {p: get_path(lp, p.split("/", 1)[1]) for p in PRUNABLE}
        new_l, keep_l = prune_layer(l, kernels_l, stats, n_tokens)
        xs = _layer_forward(model, lp, jnp.int32(l), new_l, keep_l, xs, ctxs)
        new_layers.append(new_l)
        keep_layers.append(keep_l)
    return _stack_layers(new_layers), _stack_layers(keep_layers)


@partial(jax.jit, static_argnames=("sparsity", "nm"))
def _wanda_layer(
    kernels_l: Kernels,
    stats: dict[str, Array],
    n_tokens: Array,
    factors: Kernels,
    layer: Array,
    *,
    sparsity: float,
    nm: tuple[int, int] | None,
) -> Kernels:
    """Keep masks of one layer. Score |W_ij| * ||X_j|| * factor (factors [L, ...] broadcastable
    to the stacked kernels); per output row the int(n_in * sparsity) lowest dropped, or N:M."""
    masks = {}
    for p, wk in kernels_l.items():
        rows = rows_view(wk, p, stacked=False)  # [n_in, n_out]
        f = rows_view(jnp.broadcast_to(factors[p][layer], wk.shape), p, stacked=False)
        s = jnp.abs(rows).astype(jnp.float32) * jnp.sqrt(stats[p] / n_tokens)[:, None] * f
        if nm:
            keep = keep_nm(s, *nm)
        else:  # comparison group: an output row (a column of this view)
            keep = keep_all_but_lowest(s.T, int(rows.shape[0] * sparsity)).T
        masks[p] = keep.reshape(wk.shape)
    return masks


def _wanda_like(job: Job, factors: Kernels | None) -> tuple[Kernels, Kernels]:
    if factors is None:
        factors = {p: jnp.ones((w.shape[0],) + (1,) * (w.ndim - 1), jnp.float32) for p, w in job.kernels.items()}

    def prune_layer(l, kernels_l, stats, n_tokens):
        return kernels_l, _wanda_layer(
            kernels_l, stats, jnp.float32(n_tokens), factors, jnp.int32(l), sparsity=job.sparsity, nm=job.nm
        )

    return _sequential(job, "norm", prune_layer)


def wanda(job: Job) -> tuple[Kernels, Kernels]:
    return _wanda_like(job, None)


def cap_wanda(job: Job) -> tuple[Kernels, Kernels]:
    assert job.importance is not None  # prune() requires head scores for the cap family
    return _wanda_like(job, region_factors(job.importance, job.num_kv_heads, job.options["kv_rule"], job.family))


# ---------------------------------------------------------------------------- SparseGPT
@jax.jit
def _inverse_cholesky_upper(H: Array, damp: Array) -> tuple[Array, Array]:
    """Upper Cholesky factor of (H + damp I)^-1 and whether it is finite."""
    eye = jnp.eye(H.shape[0], dtype=H.dtype)
    low = jnp.linalg.cholesky(H + damp * eye)
    hinv = jax.scipy.linalg.cho_solve((low, True), eye)
    upper = jnp.triu(jnp.linalg.cholesky(hinv).T)
    return upper, jnp.all(jnp.isfinite(upper))


def _keep_all_but_n_lowest(tmp: Array, n: int) -> Array:
    """tmp [out, m] -> keep mask dropping the n lowest per row (ties: earlier column first)."""
    return keep_nm(tmp.T, n, tmp.shape[1]).T


@partial(jax.jit, static_argnames=("ncols", "blocksize", "prune_n", "prune_m"))
def _obs_prune(
    W: Array, U: Array, ks: Array, *, ncols: int, blocksize: int, prune_n: int, prune_m: int
) -> tuple[Array, Array]:
    """SparseGPT's column sweep. W [out, n_pad] float32 (columns >= ncols are zero padding),
    U [n_pad, n_pad] upper Cholesky factor of H^-1 (identity on the padding), ks [n_blocks]
    the per-block sort index int(numel * sparsity). Returns (updated W, keep mask)."""
    n_out, n_pad = W.shape
    bs = blocksize
    col = jnp.arange(n_pad)

    def block(b, carry):
        W, keep = carry
        i1 = b * bs
        W1 = jax.lax.dynamic_slice(W, (0, i1), (n_out, bs))
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (bs, bs))
        d = jnp.diag(U1)
        if prune_n == 0:
            valid = (i1 + jnp.arange(bs)) < ncols
            tmp = jnp.where(valid[None, :], W1**2 / d[None, :] ** 2, jnp.inf)
            thresh = jnp.sort(tmp.reshape(-1))[ks[b]]
            keep1 = tmp > thresh  # SparseGPT prunes tmp <= thresh
        else:
            keep1 = jnp.ones((n_out, bs), bool)

        def column(i, c):
            W1, Q1, E1, keep1 = c
            if prune_n:
                g = jax.lax.dynamic_slice(W1, (0, i), (n_out, prune_m)) ** 2
                g = g / jax.lax.dynamic_slice(d, (i,), (prune_m,))[None, :] ** 2
                upd = jax.lax.dynamic_slice(keep1, (0, i), (n_out, prune_m)) & _keep_all_but_n_lowest(g, prune_n)
                keep1 = jnp.where(i % prune_m == 0, jax.lax.dynamic_update_slice(keep1, upd, (0, i)), keep1)
            w = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
            q = jnp.where(jax.lax.dynamic_index_in_dim(keep1, i, axis=1, keepdims=False), w, 0.0)
            err = (w - q) / d[i]
            W1 = W1 - err[:, None] * jax.lax.dynamic_index_in_dim(U1, i, axis=0, keepdims=True)
            Q1 = jax.lax.dynamic_update_index_in_dim(Q1, q, i, axis=1)
            E1 = jax.lax.dynamic_update_index_in_dim(E1, err, i, axis=1)
            return W1, Q1, E1, keep1

        zeros = jnp.zeros_like(W1)
        _, Q1, E1, keep1 = jax.lax.fori_loop(0, bs, column, (W1, zeros, zeros, keep1))
        later = jax.lax.dynamic_slice(U, (i1, 0), (bs, n_pad)) * (col >= i1 + bs)[None, :]
        W = W - jnp.matmul(E1, later, precision=_HIGHEST)
        return jax.lax.dynamic_update_slice(W, Q1, (0, i1)), jax.lax.dynamic_update_slice(keep, keep1, (0, i1))

    return jax.lax.fori_loop(0, n_pad // bs, block, (W, jnp.ones(W.shape, bool)))


def fasterprune(
    W: Array,
    H: Array,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_retries: int = 8,
) -> tuple[Array, Array]:
    """SparseGPT on one matrix: W [out, in] (HF layout), H [in, in] = 2 X X^T / n.

    Returns (updated W with pruned entries zero, keep mask [out, in], True = kept). Dead inputs (H_ii = 0)
    get H_ii = 1 and W[:, i] = 0. When a Cholesky factorization fails the dampening is raised
    tenfold (with a warning), up to `max_retries` times.
    """
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    n_out, n_in = W.shape
    if not bool(jnp.all(jnp.isfinite(H))):
        raise ValueError("SparseGPT Hessian has non-finite entries (NaN/inf calibration activations)")
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(H.dtype))
    W = jnp.where(dead[None, :], 0.0, W)
    damp = percdamp * float(jnp.mean(jnp.diag(H)))
    for _ in range(max_retries + 1):
        U, ok = _inverse_cholesky_upper(H, jnp.float32(damp))
        if bool(ok):
            break
        warnings.warn(
            f"SparseGPT: Cholesky failed with dampening {damp:.3g}; retrying with {damp * 10:.3g}",
            RuntimeWarning,
            stacklevel=2,
        )
        damp *= 10
    else:
        raise ValueError(f"SparseGPT: Cholesky failed even with dampening {damp:.3g}")
    prune_n, prune_m = nm if nm else (0, 0)
    if prune_m and blocksize % prune_m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={prune_m}")
    n_blocks = -(-n_in // blocksize)
    pad = n_blocks * blocksize - n_in
    Wp = jnp.pad(W, ((0, 0), (0, pad)))
    Up = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n_in + pad) >= n_in).astype(U.dtype)
    ks = jnp.asarray(
        [int(n_out * (min(n_in, i + blocksize) - i) * sparsity) for i in range(0, n_in, blocksize)], jnp.int32
    )
    Wn, keep = _obs_prune(Wp, Up, ks, ncols=n_in, blocksize=blocksize, prune_n=prune_n, prune_m=prune_m)
    return Wn[:, :n_in], keep[:, :n_in]


def sparsegpt(job: Job) -> tuple[Kernels, Kernels]:
    o = job.options

    def prune_layer(l, kernels_l, stats, n_tokens):
        new, masks = {}, {}
        for p, wk in kernels_l.items():
            Wt = rows_view(wk, p, stacked=False).T  # HF [out, in]
            Wn, keep = fasterprune(Wt, 2.0 * stats[p] / n_tokens, job.sparsity, job.nm, o["blocksize"], o["percdamp"])
            new[p] = Wn.T.reshape(wk.shape).astype(wk.dtype)
            masks[p] = keep.T.reshape(wk.shape)
        return new, masks

    return _sequential(job, "hessian", prune_layer)


# ---------------------------------------------------------------------------- registry
# The method table lives in `capjax.pruning.registry` (names, options, needs); METHODS is its live view.
Method = MethodSpec


def sequential_pass(job: Job, kind: str, prune_layer: Callable) -> tuple[Kernels, Kernels]:
    """The layer-by-layer driver of wanda / sparsegpt, for registered methods: for each layer l,
    prune_layer(l, kernels_l, stats, n_tokens) -> (new kernels_l, keep masks_l) keyed by PRUNABLE
    path with one layer's shapes; stats are the inputs' statistics over the calibration tokens of
    the already pruned layers below (kind "norm": sum x_j^2 [n_in]; "hessian": sum x x^T [n_in, n_in])."""
    return _sequential(job, kind, prune_layer)


__all__ = [
    "METHODS",
    "Job",
    "Method",
    "fasterprune",
    "heads_to_remove",
    "layer_slice",
    "layer_stats",
    "sequential_pass",
]
