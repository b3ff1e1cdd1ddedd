"""Every single-head ablation, layer by layer: the fast path `score_heads` and `ablate` share.

Legend: L layers, H query heads, B examples, P packed rows, S packed columns, A answer tokens.

    values = single_unit_values(model, params, batch.rows, batch.packed_ans, B, get_metric("kl"), ref,
                                replacements(model, params, batch, "mean"), 0, L, chunk)   # [L, H, B]

values[l, h, b] is the metric summed over example b's answer tokens with head h of layer l replaced
(kind and metric as in `ablate`), equal to `ablate(..., single_spec(config, "heads", keep))` row
l * H + h. One scan over the layers carries the intact hidden state; at each layer its H ablations
share it (the layers below are never recomputed), and the last layer and the metric run only at the
answer positions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from capjax import sharding
from capjax.ablation.metrics import Metric
from capjax.ablation.readout import answer_values
from capjax.model import apply_layer, layer_context, layer_params
from capjax.scan import scan_layers
from capjax.sites import Edit, Interventions, with_head_mask

Array = jax.Array


def _heads_ablation(reps: dict, l) -> Interventions | None:
    """This layer's head replacement for `apply_layer` (None for zero: the head mask alone, bit for
    bit the unablated code path)."""
    return None if reps.get("heads") is None else Interventions({"attn.z": Edit(replace=reps["heads"][l])})


@partial(
    jax.jit, static_argnames=("model", "num_examples", "metric", "num_layers", "chunk_size", "mesh", "keep", "on_layer")
)
def single_unit_values(
    model,
    params,
    rows,
    ans,
    num_examples: int,
    metric: Metric,
    ref,
    reps: dict,
    start,
    num_layers: int,
    chunk_size: int,
    mesh=None,
    keep: float = 0.0,
    on_layer: Callable | None = None,
) -> Array:
    """Per-example metric sums [num_layers, H, B] for replacing each head of layers
    start..start+num_layers-1 (one at a time) by `reps` (`capjax.ablation.replacements`; zero,
    mean or resample), mixed in with weight 1 - keep (keep = 0: fully replaced).

    rows: `PreparedBatch.rows` (tokens, segment_ids, positions [P, S], prefix [Pf]); ans:
    `PreparedBatch.packed_ans` (flat_pos, target, example) [A]; metric: `capjax.ablation.get_metric`;
    ref: the intact log-probs [A, V] when metric.needs_ref (`intact_log_probs`), else None.
    chunk_size ablations run at once (per device with `mesh`: the H ablations are split over its
    "data" axis, the hidden states kept replicated). on_layer(l) is called (host callback) as each
    layer finishes: a progress bar.
    """
    c = model.config
    L, H = c.num_layers, c.num_heads
    tokens, segment_ids, positions, prefix = rows
    x, ctx = layer_context(
        model, params, tokens, positions=positions, segment_ids=segment_ids, prefix_len=prefix.shape[0]
    )

    def replicated(y):
        return sharding.constrain_replicated(y, mesh)

    def last_layer(y, ablation=None):
        return answer_values(model, params, y, ctx, ans, num_examples, metric, ref, ablation)

    x = scan_layers(model, params, x, ctx, 0, start, constrain=replicated)

    def ablate_layer(x, l):
        lp = layer_params(params, l)
        ablation = _heads_ablation(reps, l)

        def below_last(head_mask_l):
            y = apply_layer(model, lp, x, ctx, with_head_mask(ablation, head_mask_l), layer=l)
            return last_layer(scan_layers(model, params, y, ctx, l + 1, L - 1, constrain=replicated))

        def at_last(head_mask_l):
            return last_layer(x, with_head_mask(ablation, head_mask_l))

        def one(head_mask_l):
            return jax.lax.cond(l < L - 1, below_last, at_last, head_mask_l)

        single = 1.0 - (1.0 - keep) * jnp.eye(H, dtype=model.dtype)  # row h: head h at `keep`
        if mesh is not None:
            values = sharding.sharded_map(one, single, chunk_size, mesh)
        else:
            values = jax.lax.map(one, single, batch_size=chunk_size)  # [H, B]
        if on_layer is not None:
            jax.debug.callback(on_layer, l)
        return apply_layer(model, lp, x, ctx, layer=l), values

    _, values = jax.lax.scan(ablate_layer, x, start + jnp.arange(num_layers))
    return values


__all__ = ["single_unit_values"]
