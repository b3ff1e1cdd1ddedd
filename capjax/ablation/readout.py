"""The readout every ablation path shares: the last layer and the metric at the answer positions only.

Legend: P packed rows, S packed columns, E hidden, A answer tokens, B examples, H query heads.
"""

from __future__ import annotations

import jax

from capjax.ablation.metrics import Metric
from capjax.model import apply_layer, layer_params
from capjax.sites import Interventions

Array = jax.Array


def answer_values(
    model,
    params,
    x: Array,
    ctx,
    ans,
    num_examples: int,
    metric: Metric,
    ref=None,
    ablation: Interventions | None = None,
) -> Array:
    """The metric summed per example [B] from the last layer's input x [P, S, E]: the last layer's
    o_proj and MLP, and the metric, run only at the A answer positions ans = (flat_pos, target,
    example) [A]; ablation: the last layer's interventions (a head mask is an attn.z keep)."""
    L = model.config.num_layers
    flat_pos, target, example = ans
    h = apply_layer(model, layer_params(params, L - 1), x, ctx, ablation, rows=flat_pos, layer=L - 1)
    return jax.ops.segment_sum(metric.fn(model, params, h, target, ref), example, num_segments=num_examples)


__all__ = ["answer_values"]
