"""Pruning: CAP (head importance -> weight scores -> global threshold) and the baselines
(magnitude, Wanda, SparseGPT, random), unstructured or N:M, plus sparsity reports."""

from capjax.pruning.importance import (PRUNABLE, get_kernels, importance_from_scores, kv_importance,
                                       region_factors, weight_scores)
from capjax.pruning.methods import METHODS, fasterprune, heads_to_remove
from capjax.pruning.nm import nm_prune_mask, parse_nm
from capjax.pruning.prune import SparsityReport, apply_masks, prune, sparsity_report
from capjax.pruning.threshold import (Threshold, at_most_kth, global_masks, global_threshold, lowest_k,
                                      order_key, per_matrix_masks, threshold_masks)

__all__ = [
    "METHODS", "PRUNABLE", "SparsityReport", "Threshold", "apply_masks", "at_most_kth", "fasterprune",
    "get_kernels", "global_masks", "global_threshold", "heads_to_remove", "importance_from_scores",
    "kv_importance", "lowest_k", "nm_prune_mask", "order_key", "parse_nm", "per_matrix_masks", "prune",
    "region_factors", "sparsity_report", "threshold_masks", "weight_scores",
]
