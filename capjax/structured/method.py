"""`cap_structured`: choose what to remove from CAP scores, as a plan (for `shrink`) or as masks (for
the pruning registry: the masked dense model computes what the shrunken one does).

Legend: L layers, H query heads, K kv heads, F MLP width, B calibration examples, T time.

Heads by CAP head scores (delta [L, H]); MLP channels by `mlp_score` ("gradient": the causal
first-order estimate of the loss increase, "taylor": its absolute value, "activation": Minitron's
baseline, "ablation": exact ablation of groups of `mlp_group` channels of neighbouring activation rank,
ordered by the group's loss increase, then by activation); layers by `layer_score` ("ablation":
CAP block ablation, "influence": ShortGPT's baseline). Only the scores a target needs are computed.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from capjax.structured import scores as S
from capjax.structured.plan import Plan, PlanError, Shape, budget_shape, choose, target_shape


def shape_for(config, sparsity: float | None, options: dict[str, Any]) -> Shape:
    """Explicit heads / mlp fractions (and layers) when either is set or `sparsity` is None; else a
    parameter budget: the fraction `sparsity` of the parameters removed, `layers` layers first, then
    heads and MLP channels alike."""
    heads, mlp, layers = options.get("heads", 0.0), options.get("mlp", 0.0), options.get("layers", 0)
    groups = options.get("head_groups", "auto")
    if heads or mlp or sparsity is None:
        return target_shape(config, heads=heads, mlp=mlp, layers=layers, head_groups=groups)
    return budget_shape(config, 1.0 - sparsity, layers=layers, head_groups=groups)


def describe_shape(config, sparsity: float | None, options: dict[str, Any]) -> str:
    """cap_structured's plan line for `capjax run`: what `shape_for` removes (a PlanError when the
    model cannot take it)."""
    return shape_for(config, sparsity, options).describe(config)


def structured_plan(
    model,
    params,
    shape: Shape,
    head_scores: Any = None,
    tokens=None,
    loss_mask=None,
    attention_mask=None,
    mlp_score: str = "activation",
    layer_score: str = "ablation",
    batch_size: int = 8,
    mlp_group: int = 64,
    progress: bool = False,
) -> Plan:
    """The plan keeping the highest-scoring heads, channels and layers (scores only where removed);
    `progress`: a bar over the ablations of the channel-group score (mlp_score="ablation")."""
    c = model.config
    if mlp_score not in S.CHANNEL_SCORES or layer_score not in S.LAYER_SCORES:
        raise PlanError(
            f"mlp_score={mlp_score!r} / layer_score={layer_score!r}: use one of "
            f"{', '.join(S.CHANNEL_SCORES)} / {', '.join(S.LAYER_SCORES)}"
        )
    cut_heads = shape.num_heads < c.num_heads
    cut_mlp = shape.intermediate_size < c.intermediate_size
    cut_layers = shape.num_layers < c.num_layers
    needs_answers = (cut_mlp and mlp_score != "activation") or (cut_layers and layer_score == "ablation")
    if cut_heads and head_scores is None:
        raise PlanError("removing heads needs CAP head scores (capjax score -> scores.npz, key 'delta' [L, H])")
    if (cut_mlp or cut_layers) and tokens is None:
        raise PlanError("removing MLP channels or layers needs calibration tokens")
    if needs_answers and (loss_mask is None or not np.any(np.asarray(loss_mask))):
        raise PlanError("the gradient / block-ablation scores need calibration answers (loss_mask)")
    if cut_mlp and mlp_score == "ablation" and not 1 <= int(mlp_group) <= c.intermediate_size:
        raise PlanError(f"mlp_group={mlp_group}: channels per ablated group must be 1 to {c.intermediate_size}")
    delta = getattr(head_scores, "delta", head_scores)
    chan = lay = None
    if cut_mlp:
        if mlp_score in ("activation", "ablation"):
            chan = S.channel_activation_scores(model, params, tokens, attention_mask, batch_size)
            if mlp_score == "ablation":
                groups = S.rank_groups(chan, mlp_group)
                delta_g = S.channel_group_ablation_scores(
                    model, params, tokens, loss_mask, groups, attention_mask, progress=progress
                )
                chan = S.group_scores_to_channels(delta_g, groups, chan)
        else:
            chan = S.channel_gradient_scores(model, params, tokens, loss_mask, attention_mask, batch_size)
            chan = np.abs(chan) if mlp_score == "taylor" else chan
    if cut_layers:
        lay = (
            S.layer_ablation_scores(model, params, tokens, loss_mask, attention_mask)
            if layer_score == "ablation"
            else S.layer_influence_scores(model, params, tokens, attention_mask, batch_size)
        )
    return choose(c, shape, np.asarray(delta) if cut_heads else None, chan, lay)


def plan_masks(config, kernels: dict, plan: Plan, family) -> dict:
    """Keep masks (True = kept) over the prunable kernels that remove what the plan removes: q / o by
    query head, k / v by kv head, gate / up / down by channel; a removed layer loses every kernel."""
    kept_layer = jnp.asarray(plan.layer_kept(config))  # [L]
    heads = jnp.asarray(plan.head_mask(config) > 0) & kept_layer[:, None]  # [L, H]
    kv = np.zeros((config.num_layers, config.num_kv_heads), bool)
    for i, l in enumerate(plan.layers):
        kv[l, plan.kv_heads[i]] = True
    chan = jnp.asarray(plan.channel_mask(config) > 0) & kept_layer[:, None]  # [L, F]
    by = {"query": (heads, None), "kv": (jnp.asarray(kv), None)}
    masks = {}
    for k in family.kernels:
        w = kernels[k.path]
        if k.heads:
            m, axis = by[k.heads][0], k.head_axis
        else:
            m, axis = chan, 1 if k.path.endswith("down_proj/kernel") else 2
        shape = [1] * w.ndim
        shape[0], shape[axis] = m.shape
        masks[k.path] = jnp.broadcast_to(m.reshape(shape), w.shape)
    return masks


def cap_structured(job) -> tuple[dict, dict]:
    """The registry's `cap_structured` (capjax.pruning.methods.Job): masks of the structured removal.
    Calibration without a loss_mask scores the loss of every real token (as perplexity does)."""
    o = job.options
    c = job.model.config
    shape = shape_for(c, job.sparsity, o)
    print(f"cap_structured: {shape.describe(c)}", flush=True)
    loss_mask = getattr(job, "loss_mask", None)
    if loss_mask is None and job.attention_mask is not None:  # calibration without answers: every real token
        loss_mask = np.asarray(job.attention_mask, np.float32).copy()
        loss_mask[:, 0] = 0.0
    plan = structured_plan(
        job.model,
        job.params,
        shape,
        job.delta,
        job.tokens,
        loss_mask,
        job.attention_mask,
        o["mlp_score"],
        o["layer_score"],
        o["batch_size"],
        o["mlp_group"],
        progress=True,
    )
    return job.kernels, plan_masks(c, job.kernels, plan, job.family)
