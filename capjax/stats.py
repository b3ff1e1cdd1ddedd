"""Error bars for small samples: binomial intervals, bootstrap intervals, paired differences.

Every metric capjax reports is a ratio of sums over examples: accuracy = sum(correct) / n,
answer loss = sum(answer NLL) / sum(answer tokens), perplexity = exp(sum(window NLL) /
sum(window tokens)). A metric's per-example values are therefore two arrays num [B] and
den [B] and a transform ("identity" or "exp"), and one bootstrap (resample examples with
replacement, recompute the ratio) serves all of them. Accuracies also get the binomial
standard error sqrt(p (1 - p) / n) and the Wilson score interval.

Legend: B examples, R bootstrap resamples, L layers, H query heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

TRANSFORMS: dict[str, Callable[[Any], Any]] = {"identity": lambda x: x, "exp": np.exp}
# Fewest resamples behind a bootstrap interval or test: a 95% percentile interval from fewer puts
# its ends on the two or three most extreme draws. Below it capjax gives no interval and says
# "no test" (never "n.s." or "significant" from a handful of draws).
MIN_RESAMPLES = 100


@dataclasses.dataclass(frozen=True)
class Estimate:
    """value with its standard error and a `level` interval [low, high]."""

    value: float
    stderr: float
    low: float
    high: float
    n: int
    method: str  # "wilson" | "bootstrap"
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready values (NaN, where one example leaves no spread, becomes None)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dataclasses.asdict(self).items()}


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def binomial_interval(successes: float, n: int, level: float = 0.95) -> Estimate:
    """p = k / n, stderr sqrt(p (1 - p) / n), and the Wilson score interval at `level`."""
    if n < 1:
        raise ValueError(f"binomial_interval needs n >= 1, got {n}")
    p = successes / n
    z = _z(level)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Estimate(p, math.sqrt(p * (1 - p) / n), max(0.0, center - half), min(1.0, center + half), n, "wilson", level)


def resample_weights(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[R, B] multinomial counts: how often each example appears in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (weights @ num) / (weights @ den)


def bootstrap_ratio(
    num, den, transform: str = "identity", resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> Estimate:
    """transform(sum num / sum den) with a percentile bootstrap interval over examples [B]; no
    interval (NaN) with one example or fewer than MIN_RESAMPLES resamples."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError(f"num and den must be equal non-empty [B] arrays, got {num.shape} and {den.shape}")
    f = TRANSFORMS[transform]
    value = float(f(num.sum() / den.sum()))
    enough = num.size > 1 and resamples >= MIN_RESAMPLES
    boot = f(_ratio(num, den, resample_weights(num.size, resamples, seed))) if enough else np.zeros(0)
    boot = boot[np.isfinite(boot)]
    if boot.size < 2:  # one example, too few resamples (0: no intervals asked for), or no finite resample
        return Estimate(value, math.nan, math.nan, math.nan, int(num.size), "bootstrap", level)
    a = (1 - level) / 2
    return Estimate(
        value,
        float(boot.std(ddof=1)),
        float(np.quantile(boot, a)),
        float(np.quantile(boot, 1 - a)),
        int(num.size),
        "bootstrap",
        level,
    )


def estimate(values: dict[str, Any], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """An Estimate from a per-example record {"num": [B], "den": [B], "transform", "kind"}:
    kind "proportion" (num in {0, 1}, den 1) gets the Wilson interval, "ratio" the bootstrap."""
    if values.get("kind") == "proportion":
        return binomial_interval(float(np.sum(values["num"])), len(values["num"]), level)
    return bootstrap_ratio(values["num"], values["den"], values.get("transform", "identity"), resamples, seed, level)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """b - a on the same examples, with a paired bootstrap interval; `significant` when the
    interval excludes zero (False: the difference lies inside the noise; None: no test was made,
    with one example or fewer than MIN_RESAMPLES resamples)."""

    diff: float
    low: float
    high: float
    significant: bool | None
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dataclasses.asdict(self).items()}


def paired_difference(
    a: dict[str, Any], b: dict[str, Any], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> PairedDifference:
    """metric(b) - metric(a) for two per-example records over the same B examples, resampled
    jointly (the same resample indices for both), percentile interval at `level`."""
    na, da, nb, db = (np.asarray(x, np.float64) for x in (a["num"], a["den"], b["num"], b["den"]))
    if na.shape != nb.shape:
        raise ValueError(f"paired_difference needs the same examples: {na.size} vs {nb.size} values")
    f = TRANSFORMS[a.get("transform", "identity")]
    diff = float(f(nb.sum() / db.sum()) - f(na.sum() / da.sum()))
    if na.size < 2 or resamples < MIN_RESAMPLES:
        return PairedDifference(diff, math.nan, math.nan, None, level)
    w = resample_weights(na.size, resamples, seed)
    boot = f(_ratio(nb, db, w)) - f(_ratio(na, da, w))
    boot = boot[np.isfinite(boot)]
    if boot.size < MIN_RESAMPLES:
        return PairedDifference(diff, math.nan, math.nan, None, level)
    alpha = (1 - level) / 2
    low, high = float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
    return PairedDifference(diff, low, high, bool(low > 0 or high < 0), level)


def head_interval(
    example_masked: np.ndarray,
    example_baseline: np.ndarray,
    answer_count: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> np.ndarray:
    """[2, L, H] percentile bootstrap interval of each head's loss increase, resampling
    calibration examples: per resample, sum_b w_b (nll_lhb - nll0_b) / sum_b w_b count_b.

    example_masked [L, H, B]: answer NLL summed per example with the head ablated;
    example_baseline [B]: the same, intact; answer_count [B]: answer tokens per example.
    The resampled statistic is the pooled (mean) loss increase, paired per example; it needs
    no forward pass beyond those the scores already made. Fewer than MIN_RESAMPLES resamples
    are a ValueError (`HeadScores.with_interval` then gives no interval).
    """
    if resamples < MIN_RESAMPLES:
        raise ValueError(f"head_interval: {resamples} resamples give no 95% interval; use at least {MIN_RESAMPLES}")
    L, H, B = example_masked.shape
    w = resample_weights(B, resamples, seed)  # [R, B]
    diff = (example_masked - example_baseline[None, None, :]).reshape(L * H, B)
    boot = (diff @ w.T) / (w @ np.asarray(answer_count, np.float64))[None, :]  # [L*H, R]
    alpha = (1 - level) / 2
    return np.quantile(boot, [alpha, 1 - alpha], axis=1).reshape(2, L, H)
