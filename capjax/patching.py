"""Activation patching between a clean and a corrupted batch, every unit of a site in one compiled call.

Legend: B batch, T time, L layers, H query heads, K kv heads, D head dim, E hidden, V vocab.

    res = patch(model, params, clean, corrupted, "attn.z", metric=logit_diff(answer, wrong), read_at=last)
    res.values    [L, H]     metric with head h of layer l taken from the corrupted run (noising)
    res.clean, res.corrupted  the metric of the two unpatched runs

Units: the head sites (attn.q, attn.z: H; attn.k, attn.v: K) are split by head, the E-wide sites
(resid.pre / mid / post, attn.out, mlp.out) are one block per layer; with
positions=True each unit is also split by position: values [L, T, H] or [L, T]. direction
"noising" runs the clean input with the unit's value from the corrupted run; "denoising" runs the
corrupted input with the clean value.

A metric is any JAX function of the logits returning a scalar: logits [B, V] at `read_at` [B]
(one position per row; only those positions go through the last layer and the LM head), or
[B, T, V] when read_at is None. Built in: `logit_diff`, `normalized_logit_diff`, `answer_ce`.

How: one run of the source input caches the site ([L, B, T, ...]); one run of the target caches
every layer's input (resid.pre). Then one scan over the layers: at layer l its patched runs (one per unit)
start from the target's intact input of layer l (the layers below are never recomputed), in
`lax.map` chunks of `chunk_size` vmapped units, run layers l + 1 .. L - 1 and the metric.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.cache import run_with_cache
from capjax.memory import chunk_size_for_memory, run_with_oom_fallback
from capjax.model import apply_layer, layer_context, layer_params, unembed
from capjax.scan import scan_layers
from capjax.sites import SITES, Edit, Interventions, check_sites, collect_sites

Array = jax.Array
HEAD_SITES = {"attn.q": "H", "attn.z": "H", "attn.k": "K", "attn.v": "K"}
BLOCK_SITES = ("resid.pre", "resid.mid", "resid.post", "attn.out", "mlp.out")
PATCHABLE = tuple(HEAD_SITES) + BLOCK_SITES
DIRECTIONS = ("noising", "denoising")


@dataclasses.dataclass(frozen=True)
class PatchResult:
    """values [L, (T,) (H | K)]: the metric with each unit patched; clean / corrupted: the metric of
    the unpatched clean and corrupted runs; axes names values' axes."""

    values: np.ndarray
    clean: float
    corrupted: float
    axes: tuple[str, ...]
    site: str
    direction: str

    def normalized(self) -> np.ndarray:
        """(values - corrupted) / (clean - corrupted): 1 = the clean behaviour, 0 = the corrupted one."""
        return (self.values - self.corrupted) / (self.clean - self.corrupted)


# ---------------------------------------------------------------------------- metrics
def _read(logits: Array, tokens: Array) -> Array:
    """logits [B, V] at tokens [B] -> [B]."""
    return jnp.take_along_axis(logits, jnp.asarray(tokens)[:, None], axis=-1)[:, 0]


def logit_diff(answer, wrong) -> Callable[[Array], Array]:
    """mean over rows of logit(answer) - logit(wrong), from logits [B, V] (use read_at); answer, wrong [B]."""
    answer, wrong = jnp.asarray(answer), jnp.asarray(wrong)
    return lambda logits: jnp.mean(_read(logits, answer) - _read(logits, wrong))


def normalized_logit_diff(answer, wrong, clean: float, corrupted: float) -> Callable[[Array], Array]:
    """(logit_diff - corrupted) / (clean - corrupted), with the two runs' logit differences given."""
    ld = logit_diff(answer, wrong)
    return lambda logits: (ld(logits) - corrupted) / (clean - corrupted)


def answer_ce(answer) -> Callable[[Array], Array]:
    """mean over rows of -log p(answer) from logits [B, V] (use read_at); answer [B]."""
    answer = jnp.asarray(answer)
    return lambda logits: -jnp.mean(_read(jax.nn.log_softmax(logits, axis=-1), answer))


# ---------------------------------------------------------------------------- units
def unit_axes(config, site: str, positions: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(axis names after L, unit dims over the site's keep without T) of a site's units."""
    if site not in PATCHABLE:
        known = ", ".join(PATCHABLE)
        raise ValueError(
            f"site {site!r} cannot be patched here: use one of {known}"
            if site in SITES
            else f"unknown site {site!r}: use one of {', '.join(SITES)}"
        )
    if site in HEAD_SITES:
        n = config.num_heads if HEAD_SITES[site] == "H" else config.num_kv_heads
        return (("T",) if positions else ()) + (HEAD_SITES[site],), (n,)
    return ("T",) if positions else (), ()


def _keep(u: Array, B: int, T: int, heads: tuple[int, ...], positions: bool) -> Array:
    """The keep mask of unit u: zero at the unit, one elsewhere; [heads] or [B, T, heads] (positional)."""
    shape = ((T,) if positions else ()) + heads
    keep = 1.0 - jax.nn.one_hot(u, math.prod(shape), dtype=jnp.float32).reshape(shape)
    return jnp.broadcast_to(keep, (B, *shape)) if positions else keep


# ---------------------------------------------------------------------------- the kernel
def _finish(model, params, y: Array, ctx, start, metric, read_rows, layer_iv=None, head_first: bool = False):
    """From layer `start`'s input y [B, T, E]: layers start .. L - 1 (the last one only at read_rows
    when given; layer_iv edits layer `start`) and the metric."""
    L = model.config.num_layers

    def last(x, iv):
        lp = layer_params(params, L - 1)
        if read_rows is None:
            h = apply_layer(model, lp, x, ctx, layer=L - 1, iv=iv)
            return metric(unembed(model, params, h))
        h = apply_layer(model, lp, x, ctx, rows=read_rows, layer=L - 1, iv=iv)  # [B, E]
        return metric(unembed(model, params, h))

    def below(x):
        x = apply_layer(model, layer_params(params, start), x, ctx, layer=start, iv=layer_iv)
        return last(scan_layers(model, params, x, ctx, start + 1, L - 1), None)

    def at_last(x):
        return last(x, layer_iv)

    return jax.lax.cond(start < L - 1, below, at_last, y)


@partial(jax.jit, static_argnames=("model", "metric", "site", "positions", "chunk_size"))
def patch_values(
    model,
    params,
    tokens,
    attention_mask,
    inputs,
    source,
    layers,
    metric,
    site: str,
    positions: bool,
    chunk_size: int,
    read_rows=None,
) -> Array:
    """The metric for every unit of `site` at each of `layers` -> [layers, units]: target tokens [B, T] run
    from their layer inputs `inputs` [L, B, T, E] with the unit's value replaced by `source`
    [L, B, T, ...] (the other input's values of the site)."""
    B, T = tokens.shape
    _, ctx = layer_context(model, params, tokens, attention_mask)
    _, heads = unit_axes(model.config, site, positions)
    units = math.prod(((T,) if positions else ()) + heads)

    def per_layer(_, l):
        def one(u):
            iv = Interventions({site: Edit(_keep(u, B, T, heads, positions), source[l])})
            return _finish(model, params, inputs[l], ctx, l, metric, read_rows, iv)

        return None, jax.lax.map(one, jnp.arange(units), batch_size=chunk_size)

    return jax.lax.scan(per_layer, None, layers)[1]


@partial(jax.jit, static_argnames=("model", "metric"))
def _metric_of_run(model, params, tokens, attention_mask, metric, read_rows=None):
    logits = model.apply({"params": params}, tokens, attention_mask=attention_mask)
    if read_rows is not None:
        logits = logits.reshape(-1, logits.shape[-1])[read_rows]
    return metric(logits)


def check_patch_inputs(config, clean, corrupted, attention_mask, read_at, layers) -> tuple:
    """(clean, corrupted [B, T] int32, attention_mask, read rows [B] or None, layer indices) or one-line errors."""
    clean, corrupted = np.asarray(clean), np.asarray(corrupted)
    if clean.ndim != 2 or clean.shape != corrupted.shape:
        raise ValueError(
            f"clean and corrupted tokens must both be [B, T] of one shape, got {list(clean.shape)} and "
            f"{list(corrupted.shape)}: pad them to one length (patching matches positions)"
        )
    B, T = clean.shape
    if attention_mask is not None and np.shape(attention_mask) != (B, T):
        raise ValueError(f"attention_mask has shape {list(np.shape(attention_mask))}, expected [B, T] = {[B, T]}")
    rows = None
    if read_at is not None:
        read_at = np.asarray(read_at).reshape(-1)
        if read_at.shape != (B,):
            raise ValueError(f"read_at must give one position per row, [B] = [{B}], got shape {list(read_at.shape)}")
        if read_at.min() < -T or read_at.max() >= T:
            raise ValueError(
                f"read_at position {int(read_at.max() if read_at.max() >= T else read_at.min())} is out "
                f"of range for T = {T}"
            )
        rows = jnp.asarray(np.arange(B) * T + read_at % T, jnp.int32)
    L = config.num_layers
    layers = np.arange(L) if layers is None else np.asarray(layers).reshape(-1)
    if layers.size == 0 or layers.min() < 0 or layers.max() >= L:
        bad = layers.tolist() if layers.size == 0 else int(layers.max() if layers.max() >= L else layers.min())
        raise ValueError(f"layer {bad} is out of range: the model has L = {L} layers (0 .. {L - 1})")
    am = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return jnp.asarray(clean, jnp.int32), jnp.asarray(corrupted, jnp.int32), am, rows, jnp.asarray(layers, jnp.int32)


def patch(
    model,
    params,
    clean,
    corrupted,
    site: str,
    metric: Callable[[Array], Array],
    positions: bool = False,
    direction: str = "noising",
    read_at=None,
    attention_mask=None,
    layers: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> PatchResult:
    """Activation patching of every unit of `site` (module docstring): values [L, (T,) (H | K)].

    clean, corrupted [B, T] tokens of one shape (one attention_mask [B, T] for both); read_at [B]
    (negative counts from the end): the position per row whose logits the metric reads (None:
    all, [B, T, V]); layers: a subset of layers (default all; values then [len(layers), ...]).
    Errors in these arguments are one line, raised before anything runs. chunk_size units run at
    once (default from free memory; halved on out-of-memory errors)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    check_sites([site])
    c = model.config
    axes, heads = unit_axes(c, site, positions)
    clean, corrupted, am, rows, layer_ids = check_patch_inputs(c, clean, corrupted, attention_mask, read_at, layers)
    B, T = clean.shape
    target, source_tokens = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    _, source = run_with_cache(model, params, source_tokens, [site], attention_mask=am)
    _, inputs = run_with_cache(model, params, target, ["resid.pre"], attention_mask=am)
    units = math.prod(((T,) if positions else ()) + heads)
    chunk = chunk_size or chunk_size_for_memory(
        c, B, T, model.dtype, answer_tokens=B if rows is not None else B * T, max_chunk=units
    )

    def run(ch):
        return np.asarray(
            patch_values(
                model,
                params,
                target,
                am,
                inputs["resid.pre"],
                source[site],
                layer_ids,
                metric,
                site,
                positions,
                min(ch, units),
                rows,
            )
        )

    values = run_with_oom_fallback(run, chunk)
    dims = ((T,) if positions else ()) + heads
    values = values.reshape(len(layer_ids), *dims)
    clean_m = float(_metric_of_run(model, params, clean, am, metric, rows))
    corrupted_m = float(_metric_of_run(model, params, corrupted, am, metric, rows))
    return PatchResult(values, clean_m, corrupted_m, ("L", *axes), site, direction)


# ---------------------------------------------------------------------------- path patching
RECEIVERS = ("attn.q", "attn.k", "attn.v")


def _one_path(model, params, ctx, clean, src_z, metric, read_rows, receiver: str, pair):
    """The metric for one (sender layer, sender head, receiver layer, receiver head) pair [4]."""
    ls, hs, lr, hr = pair[0], pair[1], pair[2], pair[3]
    H = model.config.num_heads
    n = H if receiver == "attn.q" else model.config.num_kv_heads
    pre, mlp_out = clean["resid.pre"], clean["mlp.out"]
    # The sender's change alone (its MLP frozen at the clean output): delta [B, T, E] of the residual stream.
    sender = Interventions(
        {
            "attn.z": Edit(1.0 - jax.nn.one_hot(hs, H, dtype=jnp.float32), src_z[ls]),
            "mlp.out": Edit(jnp.zeros(()), mlp_out[ls]),
        }
    )
    delta = apply_layer(model, layer_params(params, ls), pre[ls], ctx, layer=ls, iv=sender) - pre[ls + 1]
    # The receiver's q / k / v computed from the clean stream plus that change (every path in between frozen).
    _, got = apply_layer(
        model, layer_params(params, lr), pre[lr] + delta, ctx, layer=lr, iv=Interventions({}, frozenset({receiver}))
    )
    iv = Interventions({receiver: Edit(1.0 - jax.nn.one_hot(hr, n, dtype=jnp.float32), got[receiver])})
    return _finish(model, params, pre[lr], ctx, lr, metric, read_rows, iv)


@partial(jax.jit, static_argnames=("model", "metric", "receiver", "chunk_size"))
def path_values(
    model, params, tokens, attention_mask, clean, src_z, pairs, metric, receiver: str, chunk_size: int, read_rows=None
) -> Array:
    """The metric for each of the pairs [pairs, 4] (sender layer, head, receiver layer, head); clean:
    the target's cached {"resid.pre", "mlp.out"} [L, ...]; src_z the source's attn.z [L, B, T, H, D]."""
    _, ctx = layer_context(model, params, tokens, attention_mask)
    return jax.lax.map(
        partial(_one_path, model, params, ctx, clean, src_z, metric, read_rows, receiver), pairs, batch_size=chunk_size
    )


def path_patch(
    model,
    params,
    clean,
    corrupted,
    pairs: Sequence[tuple[int, int, int, int]],
    metric: Callable[[Array], Array],
    receiver: str = "attn.q",
    direction: str = "noising",
    read_at=None,
    attention_mask=None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Path patching (the IOI paper's construction) for pairs [(sender layer, sender head, receiver
    layer, receiver head)]: the target run (clean for noising) with the sender head's output taken
    from the source run only on its direct path, through the residual stream, into the receiver's
    `receiver` input (attn.q: a query head; attn.k / attn.v: a kv head); every other path, MLPs
    included, keeps the target's values. Returns the metric per pair; all pairs in one compiled
    call (chunks of chunk_size). Bad pairs (out of range, receiver not above sender) are one line."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    if receiver not in RECEIVERS:
        raise ValueError(f"unknown receiver {receiver!r}: use one of {', '.join(RECEIVERS)}")
    c = model.config
    L, H = c.num_layers, c.num_heads
    n = H if receiver == "attn.q" else c.num_kv_heads
    pairs_np = np.asarray(pairs, np.int64).reshape(-1, 4) if len(pairs) else np.zeros((0, 4), np.int64)
    if not len(pairs_np):
        raise ValueError("pairs is empty: give (sender layer, sender head, receiver layer, receiver head) tuples")
    for i, (ls, hs, lr, hr) in enumerate(pairs_np.tolist()):
        if not (0 <= ls < L and 0 <= lr < L and 0 <= hs < H and 0 <= hr < n and lr > ls):
            raise ValueError(
                f"pair {i} {(ls, hs, lr, hr)} is out of range: layers 0 .. {L - 1} with the receiver "
                f"above the sender, sender heads 0 .. {H - 1}, receiver heads 0 .. {n - 1} ({receiver})"
            )
    clean, corrupted, am, rows, _ = check_patch_inputs(c, clean, corrupted, attention_mask, read_at, None)
    target, source_tokens = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    _, src = run_with_cache(model, params, source_tokens, ["attn.z"], attention_mask=am)
    _, cache = run_with_cache(model, params, target, ["resid.pre", "mlp.out"], attention_mask=am)
    B, T = clean.shape
    N = len(pairs_np)
    chunk = chunk_size or chunk_size_for_memory(
        c, B, T, model.dtype, answer_tokens=B if rows is not None else B * T, max_chunk=N
    )

    def run(ch):
        return np.asarray(
            path_values(
                model,
                params,
                target,
                am,
                cache,
                src["attn.z"],
                jnp.asarray(pairs_np, jnp.int32),
                metric,
                receiver,
                min(ch, N),
                rows,
            )
        )

    return run_with_oom_fallback(run, chunk)


# ---------------------------------------------------------------------------- attribution patching
def _unit_sum(a: Array, site: str, positions: bool) -> Array:
    """a [L, B, T, ...] summed over everything but the units: [L, (T,) (H | K)]."""
    a = a.sum(axis=1)  # over B
    if site in HEAD_SITES:  # [L, T, n, D]
        a = a.sum(axis=-1)
        return a if positions else a.sum(axis=1)
    a = a.sum(axis=-1)  # [L, T]
    return a if positions else a.sum(axis=1)


@partial(jax.jit, static_argnames=("model", "metric", "site", "positions"))
def _attribution(model, params, target, attention_mask, source, metric, site: str, positions: bool, read_rows=None):
    """(sum over each unit of (source - target value) * d metric / d value at the target run, metric)."""

    def run(add):
        logits, cache = model.apply(
            {"params": params},
            target,
            attention_mask=attention_mask,
            interventions=Interventions({site: Edit(add=add)}, {site}),
            mutable=["sites"],
        )
        if read_rows is not None:
            logits = logits.reshape(-1, logits.shape[-1])[read_rows]
        return metric(logits), cache

    zeros = jnp.zeros_like(source)
    (value, state), grad = jax.value_and_grad(run, has_aux=True)(zeros)
    here = collect_sites(state["sites"])[site]
    return _unit_sum((source - here) * grad, site, positions), value


def attribution_patch(
    model,
    params,
    clean,
    corrupted,
    site: str,
    metric: Callable[[Array], Array],
    positions: bool = False,
    direction: str = "noising",
    read_at=None,
    attention_mask=None,
    exact: PatchResult | None = None,
) -> dict:
    """Attribution patching (the gradient approximation of `patch`): for every unit,
    metric(target) + (source value - target value) . d metric / d value, all units from one
    forward and one backward pass of the target. {"values": [L, (T,) (H | K)] the estimated patched
    metric, "baseline": the target's metric}; with `exact` (a `patch` result of the same
    arguments), also "correlation" (Pearson, over units) of the estimated and exact changes."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    check_sites([site])
    unit_axes(model.config, site, positions)
    clean, corrupted, am, rows, _ = check_patch_inputs(model.config, clean, corrupted, attention_mask, read_at, None)
    target, source_tokens = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    _, source = run_with_cache(model, params, source_tokens, [site], attention_mask=am)
    delta, base = _attribution(model, params, target, am, source[site], metric, site, positions, rows)
    out: dict[str, Any] = {"values": float(base) + np.asarray(delta, np.float64), "baseline": float(base)}
    if exact is not None:
        if exact.values.shape != out["values"].shape:
            raise ValueError(
                f"exact has shape {list(exact.values.shape)}, expected {list(out['values'].shape)}: "
                "pass patch() of the same site, positions and layers"
            )
        base_exact = exact.clean if exact.direction == "noising" else exact.corrupted
        out["correlation"] = float(
            np.corrcoef((out["values"] - base).ravel(), (exact.values - base_exact).ravel())[0, 1]
        )
    return out


__all__ = [
    "DIRECTIONS",
    "PATCHABLE",
    "PatchResult",
    "RECEIVERS",
    "answer_ce",
    "attribution_patch",
    "check_patch_inputs",
    "logit_diff",
    "normalized_logit_diff",
    "patch",
    "patch_values",
    "path_patch",
    "path_values",
    "unit_axes",
]
