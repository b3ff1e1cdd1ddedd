"""Pruning: CAP (head importance -> weight scores -> global threshold) and the baselines
(magnitude, Wanda, SparseGPT, random), unstructured or N:M, plus sparsity reports."""

from capjax.pruning.importance import (
    PRUNABLE,
    get_kernels,
    importance_from_scores,
    kv_importance,
    region_factors,
    weight_scores,
)
from capjax.pruning.methods import METHODS, fasterprune, heads_to_remove
from capjax.pruning.nm import keep_nm, parse_nm
from capjax.pruning.prune import SparsityReport, apply_masks, prune, sparsity_report
from capjax.pruning.threshold import (
    Threshold,
    global_threshold,
    keep_above_kth,
    keep_all_but_lowest,
    keep_by_threshold,
    keep_global,
    keep_per_matrix,
    order_key,
)

__all__ = [
    "METHODS",
    "PRUNABLE",
    "SparsityReport",
    "Threshold",
    "apply_masks",
    "fasterprune",
    "get_kernels",
    "global_threshold",
    "heads_to_remove",
    "importance_from_scores",
    "keep_above_kth",
    "keep_all_but_lowest",
    "keep_by_threshold",
    "keep_global",
    "keep_nm",
    "keep_per_matrix",
    "kv_importance",
    "order_key",
    "parse_nm",
    "prune",
    "region_factors",
    "sparsity_report",
    "weight_scores",
]
