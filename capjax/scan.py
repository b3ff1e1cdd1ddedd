"""The one layer scan: every path that walks the decoder layer by layer runs `scan_layers`, the
model's own forward included.

Legend: B batch, T time, S key time, E hidden, L layers, K kv heads, D head dim,
n = stop - start layers run.

    x, ctx = capjax.model.layer_context(model, params, tokens, ...)
    x = scan_layers(model, params, x, ctx)                                  # all L layers
    x = scan_layers(model, params, x, ctx, start, L - 1, iv)                # some, with interventions
    x, inputs = scan_layers(model, params, x, ctx, collect="inputs")        # inputs [L, B, T, E]
    x, sites = scan_layers(model, params, x, ctx, iv=Interventions(capture={"attn.z"}), collect="sites")
    x, sums = scan_layers(model, params, x, ctx, iv=..., collect=lambda x_in, x_out, sites: ...)  # [L, ...]
    x, ys, kv = scan_layers(model, params, x, ctx, kv={"k": k, "v": v}, cache_index=i)  # k, v [L, B, S, K, D]

Interventions enter only through `iv`: a `capjax.sites.Interventions` stacked over the L layers
(every leaf [L, ...]; layer l runs `iv.at(l)`), e.g. a head mask [L, H] is
`Interventions({"attn.z": Edit(keep=head_mask)})`. iv None is the plain path, bit for bit.

Its users: `capjax.model.Decoder` (evaluation's forward, `hidden_states`, `run_with_cache` and
cached generation: the per-layer KV cache slices are scanned in and out with `kv`), scoring
(`capjax.ablation`, `capjax.score_heads`), the ablation kinds' statistics, patching, structured
pruning's scores and recovery's training forward. Only `init` still builds the params with flax's
`nn.scan` (the same per-layer random keys as before, so `init_params(config, seed)` is unchanged).

`scan_layers` is defined in `capjax.model` (the `Decoder` there runs it, and imports only point
down); this module is its documented import path.
"""

from __future__ import annotations

from capjax.model import COLLECT, scan_layers

__all__ = ["COLLECT", "scan_layers"]
