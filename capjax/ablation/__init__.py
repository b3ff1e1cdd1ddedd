"""Vectorized ablation studies: any component, any ablation kind, any metric, per-example results.

Legend: N ablations, B examples, L layers, H query heads.

    from capjax.ablation import ablate, prepare_batch, single_spec
    batch = prepare_batch(model, calib.tokens, calib.loss_mask, calib.attention_mask)
    res = ablate(model, params, batch, single_spec(model.config, "heads"), kind="mean", metric="kl")
    res.values [N, B], res.delta() [N]

See docs/research.md.
"""

from capjax.ablation.batch import AnswerPositions, PreparedBatch, answer_positions, prepare_batch
from capjax.ablation.core import (
    AblationResult,
    ablate,
    ablated_values,
    answer_values,
    gradient_deltas,
    intact_inputs,
    intact_log_probs,
    intact_values,
    intervened_values,
    spec_interventions,
    values_batch,
    values_jacobian,
)
from capjax.ablation.kinds import (
    KINDS,
    component_outputs,
    kept_weights,
    register_kind,
    replacements,
    resample_pairing,
    unregister_kind,
)
from capjax.ablation.metrics import (
    CE,
    KL,
    METRICS,
    Metric,
    get_metric,
    logits_metric,
    register_metric,
    unregister_metric,
)
from capjax.ablation.single import single_unit_values
from capjax.ablation.spec import COMPONENTS, ablation_spec, concat_specs, pairs_spec, single_spec, units, units_spec

__all__ = [
    "AblationResult",
    "AnswerPositions",
    "CE",
    "COMPONENTS",
    "KINDS",
    "KL",
    "METRICS",
    "Metric",
    "PreparedBatch",
    "ablate",
    "ablated_values",
    "ablation_spec",
    "answer_positions",
    "answer_values",
    "component_outputs",
    "concat_specs",
    "get_metric",
    "gradient_deltas",
    "intact_inputs",
    "intact_log_probs",
    "intact_values",
    "intervened_values",
    "kept_weights",
    "logits_metric",
    "pairs_spec",
    "prepare_batch",
    "register_kind",
    "register_metric",
    "replacements",
    "resample_pairing",
    "single_spec",
    "single_unit_values",
    "spec_interventions",
    "units",
    "units_spec",
    "unregister_kind",
    "unregister_metric",
    "values_batch",
    "values_jacobian",
]
