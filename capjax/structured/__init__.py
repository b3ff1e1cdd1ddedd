"""Structured compression: remove attention heads, MLP channels and whole layers, giving a smaller
standard model (docs/structured.md).

    shape = target_shape(model.config, heads=0.25, mlp=0.25, layers=2)
    plan = choose(model.config, shape, head_scores=delta, channel_scores=..., layer_scores=...)
    small, small_params = shrink(model, params, plan)
    capjax.save_pretrained(small, small_params, "out/")
"""

from capjax.structured.mask import masked_logits
from capjax.structured.plan import Plan, PlanError, Shape, budget_shape, choose, target_shape
from capjax.structured.shrink import shrink, shrink_params

__all__ = [
    "Plan",
    "PlanError",
    "Shape",
    "budget_shape",
    "choose",
    "masked_logits",
    "shrink",
    "shrink_params",
    "target_shape",
]
