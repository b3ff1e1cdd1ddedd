"""The one layer scan: every path that walks the decoder layer by layer on flat params runs this.

Legend: B batch, T time, E hidden, L layers, n = stop - start layers run.

    x, ctx = capjax.model.layer_context(model, params, tokens, ...)
    x = scan_layers(model, params, x, ctx)                                  # all L layers
    x = scan_layers(model, params, x, ctx, start, L - 1, iv)                # some, with interventions
    x, inputs = scan_layers(model, params, x, ctx, collect="inputs")        # inputs [L, B, T, E]
    x, sites = scan_layers(model, params, x, ctx, iv=Interventions(capture={"attn.z"}), collect="sites")
    x, sums = scan_layers(model, params, x, ctx, iv=..., collect=lambda x_in, x_out, sites: ...)  # [L, ...]

Interventions enter only through `iv`: a `capjax.sites.Interventions` stacked over the L layers
(every leaf [L, ...]; layer l runs `iv.at(l)`), e.g. a head mask [L, H] is
`Interventions({"attn.z": Edit(keep=head_mask)})`. iv None is the plain path, bit for bit.

Scoring (`capjax.ablation`, `capjax.score_heads`), the ablation kinds' statistics, patching and
recovery's training forward use it; `capjax.model.Decoder` (evaluation, generation) scans the same
`DecoderLayer` with flax's `nn.scan`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from capjax.model import apply_layer, layer_params
from capjax.sites import Interventions

Array = jax.Array
COLLECT = (None, "inputs", "sites")


def scan_layers(
    model,
    params,
    x: Array,
    ctx,
    start: int | Array = 0,
    stop: int | Array | None = None,
    iv: Interventions | None = None,
    *,
    collect: str | Callable | None = None,
    layers: tuple[Any, Callable] | None = None,
    remat: bool = False,
    constrain: Callable[[Array], Array] | None = None,
):
    """Layers start .. stop - 1 (default all L) on x [B, T, E] -> x [B, T, E]; with `collect`,
    (x, ys) where ys is stacked over the n layers run.

    start / stop: ints, or traced int32 (then the loop is a while loop; `collect`, `layers` and
    `remat` need the static full range). iv: stacked interventions (module docstring) or None.
    collect: "inputs": ys = every layer's input [n, B, T, E]; "sites": ys = the sites iv captures,
    {site: [n, ...]}; a function f(x_in, x_out, sites) -> pytree: its per-layer result (a
    reduction of the captured sites, say, so that nothing [n, B, T, ...] is kept), stacked.
    layers: (tree, fn) scans over the leading axis of a stacked tree with fn(slice) as each
    layer's params (recovery's trainable / masked layers) instead of params["layers"].
    remat: recompute each layer in the backward pass (`jax.checkpoint`). constrain: applied to
    every layer's output (a sharding constraint)."""
    if not (collect in COLLECT or callable(collect)):
        raise ValueError(f"collect must be one of {COLLECT} or a function, got {collect!r}")
    if collect == "sites" and not (iv is not None and iv.capture):
        raise ValueError("collect='sites' needs interventions that capture sites (Interventions(capture={...}))")
    stop = model.config.num_layers if stop is None else stop

    def layer(x, l, lp):
        out = apply_layer(model, lp, x, ctx, layer=l, iv=None if iv is None else iv.at(l))
        y, sites = out if iv is not None and iv.capture else (out, None)
        return (y if constrain is None else constrain(y)), sites

    if collect is None and layers is None and not remat:
        return jax.lax.fori_loop(start, stop, lambda l, x: layer(x, l, layer_params(params, l))[0], x)

    def body(x, item):
        l, tree = item
        y, sites = layer(x, l, layer_params(params, l) if layers is None else layers[1](tree))
        if callable(collect):
            return y, collect(x, y, sites)
        return y, {"inputs": x, "sites": sites}.get(collect)

    tree = None if layers is None else layers[0]
    x, ys = jax.lax.scan(jax.checkpoint(body) if remat else body, x, (jnp.arange(start, stop), tree))
    return x if collect is None else (x, ys)


__all__ = ["COLLECT", "scan_layers"]
