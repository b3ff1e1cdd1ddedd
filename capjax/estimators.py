"""Scoring estimators: a component's score from per-example results, with no further forward pass.

Legend: N ablations (or units, e.g. the L * H heads), B examples, U subsets.

Inputs are what `capjax.ablation.ablate` returns: values [N, B] (the metric summed over each
example's answer tokens under each ablation), intact [B], count [B] answer tokens per example.
Built-ins (the first three are `capjax.score_heads`'s aggregates, on the same U contiguous subsets,
`numpy.array_split`):

    median     median_u masked[u] - mean_u baseline[u]   (the paper)
    mean       mean_u masked[u] - mean_u baseline[u]
    paired     median_u (masked[u] - baseline[u])
    bootstrap  mean over `resamples` bootstrap draws of the B examples (seeded) of the token-level
               masked - baseline difference

where masked[u] [N] and baseline[u] are the token-level losses of subset u (`subset_losses`).
A new estimator is one call: `register_estimator("trimmed", fn)` with
fn(values, intact, count, subsets=3, **options) -> [N].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from capjax.plugins import load_plugins
from capjax.registry import Registry

Estimator = Callable[..., np.ndarray]
# how head scores are computed (`capjax.score_heads(method=...)`, the config's calibration.method,
# `capjax score --method`): exact ablation, or the gradient approximation
SCORING_METHODS = ("ablation", "gradient")
# the built-ins computed from per-subset losses alone (all gradient scoring has: no per-example values)
SUBSET_AGGREGATES = ("median", "mean", "paired")
_ESTIMATORS: Registry[Estimator] = Registry(
    "estimator", on_read=load_plugins, unknown="unknown estimator {name!r}; registered: {known}"
)


def subset_groups(num_examples: int, subsets: int) -> list[np.ndarray]:
    """The U contiguous near-equal splits of range(B) (as `capjax.score_heads`)."""
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subsets > num_examples:
        raise ValueError(
            f"subsets={subsets} is larger than the calibration set ({num_examples} examples): "
            "use fewer subsets or more examples"
        )
    return np.array_split(np.arange(num_examples), subsets)


def subset_losses(
    values: np.ndarray, intact: np.ndarray, count: np.ndarray, subsets: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(masked [U, N], baseline [U]): token-level loss of each subset under each ablation, and intact."""
    values, intact, count = np.asarray(values, np.float64), np.asarray(intact, np.float64), np.asarray(count)
    groups = subset_groups(values.shape[1], subsets)
    onehot = np.zeros((len(groups), values.shape[1]))
    for k, g in enumerate(groups):
        onehot[k, g] = 1.0
    n = onehot @ count
    if np.any(n == 0):
        k = int(np.argmin(n))
        raise ValueError(
            f"subset {k} (examples {groups[k][0]}..{groups[k][-1]}) has no answer tokens: "
            "shuffle the calibration set or use fewer subsets"
        )
    return (onehot @ values.T) / n[:, None], onehot @ intact / n


def register_estimator(name: str, fn: Estimator, replace: bool = False) -> None:
    """Registers fn(values [N, B], intact [B], count [B], subsets=3, **options) -> scores [N]."""
    _ESTIMATORS.register(name, fn, replace=replace)


def unregister_estimator(name: str) -> None:
    """Removes a registered estimator (tests, or replacing a plugin's)."""
    _ESTIMATORS.unregister(name, builtins=True)


def get(name: str) -> Estimator:
    """The registered estimator function `name` (an unknown name: a ValueError listing the known ones)."""
    return _ESTIMATORS.lookup(name)


def names() -> tuple[str, ...]:
    """Registered estimator names (built-ins, then yours and plugins')."""
    return _ESTIMATORS.names()


def estimate(
    name: str, values: np.ndarray, intact: np.ndarray, count: np.ndarray, subsets: int = 3, **options
) -> np.ndarray:
    """Scores [N] (higher = more important) by the registered estimator `name`."""
    fn = get(name)
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or np.shape(intact) != values.shape[1:] or np.shape(count) != values.shape[1:]:
        raise ValueError(
            f"estimate needs values [N, B], intact [B], count [B]; got {values.shape}, "
            f"{np.shape(intact)}, {np.shape(count)}"
        )
    return fn(values, np.asarray(intact, np.float64), np.asarray(count, np.float64), subsets=subsets, **options)


def from_subsets(name: str, masked: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """median / mean / paired (module docstring) from per-subset losses masked [U, ...] and baseline
    [U] -> [...] (what gradient scores have, which keep no per-example losses)."""
    if name == "median":
        return np.median(masked, axis=0) - baseline.mean()
    if name == "mean":
        return masked.mean(axis=0) - baseline.mean()
    if name == "paired":
        return np.median(masked - baseline.reshape(-1, *(1,) * (masked.ndim - 1)), axis=0)
    raise ValueError(f"unknown aggregate {name!r}: use one of {SUBSET_AGGREGATES}")


def median(values, intact, count, subsets=3):
    return from_subsets("median", *subset_losses(values, intact, count, subsets))


def mean(values, intact, count, subsets=3):
    return from_subsets("mean", *subset_losses(values, intact, count, subsets))


def paired(values, intact, count, subsets=3):
    return from_subsets("paired", *subset_losses(values, intact, count, subsets))


def bootstrap(values, intact, count, subsets=3, resamples: int = 200, seed: int = 0):
    """Mean over bootstrap draws of the examples of (token-level masked - intact); `subsets` unused."""
    rng = np.random.default_rng(seed)
    B = values.shape[1]
    draws = rng.integers(0, B, size=(resamples, B))
    w = np.stack([np.bincount(d, minlength=B) for d in draws]).astype(np.float64)  # [R, B]
    n = w @ count
    diff = (w @ (values - intact[None, :]).T) / n[:, None]  # [R, N]
    return diff.mean(axis=0)


for _name, _fn in (("median", median), ("mean", mean), ("paired", paired), ("bootstrap", bootstrap)):
    _ESTIMATORS.register(_name, _fn, builtin=True)

__all__ = [
    "SUBSET_AGGREGATES",
    "bootstrap",
    "estimate",
    "from_subsets",
    "mean",
    "median",
    "names",
    "paired",
    "register_estimator",
    "subset_groups",
    "subset_losses",
    "unregister_estimator",
]
