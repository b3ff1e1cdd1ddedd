"""An activation cache: the logits and the values of chosen named sites, stacked over layers.

Legend: B batch, T time, S key time (= T; Pf + T with a shared prefix of Pf tokens), L layers,
H query heads, K kv heads, D head dim, E hidden, F MLP width, V vocab.

    logits, cache = capjax.run_with_cache(model, params, tokens, sites=["attn.z", "resid.post"])
    cache["attn.z"]      [L, B, T, H, D]
    cache["resid.post"]  [L, B, T, E]

Sites and their shapes: `capjax.sites.SITES` (each cached value gets a leading L). Only the
requested sites are kept: the others are never written out, so a cache of one site costs that
site's memory. Before computing, the cache's size is checked against the free memory
(`capjax.memory.available_bytes`); a cache that would not fit is refused with one line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.memory import InsufficientMemoryError, available_bytes
from capjax.model import layer_context, unembed
from capjax.scan import scan_layers
from capjax.sites import Interventions, check_sites, collect_sites, with_head_mask

Array = jax.Array


def site_shape(config, site: str, batch: int, seq_len: int, key_len: int | None = None) -> tuple[int, ...]:
    """One layer's value shape of `site` (`capjax.sites.SITES`) for a [batch, seq_len] input whose
    queries see key_len keys (default seq_len; Pf + T with a shared prefix)."""
    B, T = batch, seq_len
    S = T if key_len is None else key_len
    E, F, H, K, D = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    )
    shapes = {
        "resid.pre": (B, T, E),
        "attn.in": (B, T, E),
        "attn.q": (B, T, H, D),
        "attn.k": (B, T, K, D),
        "attn.v": (B, T, K, D),
        "attn.pattern": (B, H, T, S),
        "attn.z": (B, T, H, D),
        "attn.out": (B, T, E),
        "resid.mid": (B, T, E),
        "mlp.in": (B, T, E),
        "mlp.hidden": (B, T, F),
        "mlp.out": (B, T, E),
        "resid.post": (B, T, E),
    }
    return shapes[check_sites([site])[0]]


def cache_bytes(
    config, sites: Sequence[str], batch: int, seq_len: int, dtype: Any = jnp.float32, key_len: int | None = None
) -> int:
    """Bytes of a cache of `sites` over all L layers (the logits [B, T, V] float32 not included);
    key_len as in `site_shape`."""
    itemsize = jnp.dtype(dtype).itemsize
    return sum(
        config.num_layers * math.prod(site_shape(config, s, batch, seq_len, key_len)) * itemsize
        for s in check_sites(sites)
    )


def check_cache_fits(
    config,
    sites: Sequence[str],
    batch: int,
    seq_len: int,
    dtype: Any = jnp.float32,
    budget_bytes: int | None = None,
    key_len: int | None = None,
) -> int:
    """The cache's bytes plus its logits, or InsufficientMemoryError (one line) when that exceeds the
    budget (default `capjax.memory.available_bytes()`)."""
    need = cache_bytes(config, sites, batch, seq_len, dtype, key_len) + batch * seq_len * config.vocab_size * 4
    have = available_bytes() if budget_bytes is None else budget_bytes
    if need > have:
        raise InsufficientMemoryError(
            f"run_with_cache: caching {', '.join(sites)} on [{batch}, {seq_len}] tokens needs "
            f"{_size(need)} (with the logits), but {_size(have)} are free. Fix: cache "
            "fewer sites, or run fewer / shorter sequences per call"
        )
    return need


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


@partial(jax.jit, static_argnames=("model",))
def _run(model, params, tokens, attention_mask, interventions, head_mask):
    logits, state = model.apply(
        {"params": params},
        tokens,
        head_mask=head_mask,
        attention_mask=attention_mask,
        interventions=interventions,
        mutable=["sites"],
    )
    return logits, collect_sites(state.get("sites", {}))


@partial(jax.jit, static_argnames=("model", "prefix_len"))
def _run_packed(model, params, tokens, segment_ids, positions, interventions, head_mask, prefix_len):
    x, ctx = layer_context(model, params, tokens, None, positions, segment_ids, prefix_len)
    iv = with_head_mask(interventions, None if head_mask is None else head_mask.astype(model.dtype))
    if iv.capture:
        x, cached = scan_layers(model, params, x, ctx, iv=iv, collect="sites")
    else:
        x, cached = scan_layers(model, params, x, ctx, iv=iv), {}
    return unembed(model, params, x), cached


def run_with_cache(
    model,
    params,
    tokens,
    sites: Sequence[str],
    attention_mask=None,
    interventions: Interventions | None = None,
    head_mask=None,
    budget_bytes: int | None = None,
    segment_ids=None,
    positions=None,
    prefix_len: int = 0,
) -> tuple[Array, dict[str, Array]]:
    """(logits [B, T, V] float32, {site: [L, ...]}) for tokens [B, T] (attention_mask [B, T] as in
    `capjax.model.Decoder`), with `interventions` (stacked over layers) and `head_mask` [L, H]
    applied while running; the cached values are the sites' values after those edits.

    Packed rows (`capjax.packing`: several examples per row): pass segment_ids [B, T] (0 = padding)
    and positions [B, T] (restarting at 0 in each segment) instead of attention_mask; each example
    then sees only its own tokens, and its values equal those of the example run alone (the
    pattern's keys are the row's T, zero outside the example's segment).

    Shared prefix (`capjax.packing.pack_examples(share_prefix=True)`): prefix_len Pf > 0 (with
    segment_ids and positions) says row 0 starts with Pf tokens of segment -1 that every segment
    sees before its own tokens. The pattern's key axis is then Pf + T: [L, B, H, T, Pf + T], keys
    row 0's Pf prefix tokens, then the row's own T; every other site keeps its [L, B, T, ...] shape,
    the prefix's own values at row 0's first Pf positions. An example's values equal those of its
    whole sequence (prefix, then its own tokens) run alone.

    One compiled call (jittable itself: the checks read shapes only). An unknown site name lists
    the known ones; a cache larger than `budget_bytes` (default the free memory) is refused before
    anything runs."""
    sites = check_sites(sites)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] integers, got shape {tuple(tokens.shape)}")
    B, T = tokens.shape
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int | np.integer) or prefix_len < 0:
        raise ValueError(f"run_with_cache: prefix_len must be an int >= 0 (shared prefix tokens), got {prefix_len!r}")
    if prefix_len and (segment_ids is None or positions is None):
        raise ValueError(
            "run_with_cache: prefix_len (a shared prefix) needs segment_ids and positions (both [B, T]; "
            "see capjax.packing.pack_examples(share_prefix=True))"
        )
    if prefix_len > T:
        raise ValueError(
            f"run_with_cache: prefix_len {prefix_len} is longer than the rows ({T} tokens): the prefix is "
            "row 0's first prefix_len tokens"
        )
    prefix_len = int(prefix_len)
    check_cache_fits(model.config, sites, B, T, model.dtype, budget_bytes, prefix_len + T)
    iv = interventions or Interventions()
    iv = Interventions(iv.edits, iv.capture | frozenset(sites))
    if segment_ids is not None or positions is not None:
        if segment_ids is None or positions is None or attention_mask is not None:
            raise ValueError(
                "run_with_cache: packed rows take segment_ids and positions (both [B, T]) and no "
                "attention_mask (padding is segment 0)"
            )
        segment_ids, positions = jnp.asarray(segment_ids), jnp.asarray(positions)
        c = model.config
        if head_mask is not None and jnp.shape(head_mask) != (c.num_layers, c.num_heads):
            raise ValueError(
                f"head_mask has shape {tuple(jnp.shape(head_mask))}, expected [L, H] = [{c.num_layers}, {c.num_heads}]"
            )
        if segment_ids.shape != tokens.shape or positions.shape != tokens.shape:
            raise ValueError(
                f"run_with_cache: segment_ids {tuple(segment_ids.shape)} and positions "
                f"{tuple(positions.shape)} must have the tokens' shape {tuple(tokens.shape)}"
            )
        hm = None if head_mask is None else jnp.asarray(head_mask)
        return _run_packed(model, params, tokens, segment_ids, positions, iv, hm, prefix_len)
    return _run(
        model,
        params,
        tokens,
        None if attention_mask is None else jnp.asarray(attention_mask),
        iv,
        None if head_mask is None else jnp.asarray(head_mask),
    )


__all__ = ["cache_bytes", "check_cache_fits", "run_with_cache", "site_shape"]
