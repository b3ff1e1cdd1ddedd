"""Error bars: interval formulas against scipy and hand computations, bootstrap coverage on a
case with known variance, and per-example head losses against a loop of forwards."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

import capjax
from capjax import stats
from conftest import make_hf_model


@pytest.mark.parametrize("k,n", [(3, 16), (0, 16), (16, 16), (40, 97)])
def test_binomial_interval_matches_scipy_wilson(k, n):
    e = stats.binomial_interval(k, n)
    ci = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert e.value == k / n
    assert e.stderr == pytest.approx(math.sqrt(k / n * (1 - k / n) / n), abs=1e-15)
    assert (e.low, e.high) == (pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9))


def test_binomial_by_hand():
    # 3 of 16: se = sqrt(0.1875 * 0.8125 / 16) = 0.09758 (the "0.1875 ± 0.098" of the report)
    e = stats.binomial_interval(3, 16)
    assert round(e.stderr, 5) == 0.09758
    z = 1.959963984540054
    center = (3 / 16 + z * z / 32) / (1 + z * z / 16)
    half = z * math.sqrt(3 / 16 * 13 / 16 / 16 + z * z / (4 * 256)) / (1 + z * z / 16)
    assert e.low == pytest.approx(center - half) and e.high == pytest.approx(center + half)


def test_bootstrap_interval_covers_the_truth_at_its_rate():
    """Mean of N=60 normal draws (sd 2, true mean 1): the 95% interval should cover 1 in about 95%
    of 300 repetitions; its stderr should be near 2 / sqrt(60)."""
    rng = np.random.default_rng(0)
    covered, ses = 0, []
    for rep in range(300):
        x = rng.normal(1.0, 2.0, 60)
        e = stats.bootstrap_ratio(x, np.ones_like(x), resamples=400, seed=rep)
        covered += e.low <= 1.0 <= e.high
        ses.append(e.stderr)
    assert 0.88 <= covered / 300 <= 0.99  # percentile bootstrap at N=60 runs slightly under 95%
    assert np.mean(ses) == pytest.approx(2 / math.sqrt(60), rel=0.08)


def test_bootstrap_ratio_transform_and_loop():
    rng = np.random.default_rng(1)
    num, den = rng.gamma(5, 1, 20), rng.integers(5, 9, 20).astype(float)
    e = stats.bootstrap_ratio(num, den, "exp", resamples=200, seed=3)
    assert e.value == pytest.approx(math.exp(num.sum() / den.sum()))
    # the same resamples by a plain loop over index draws
    w = stats.resample_weights(20, 200, 3)
    loop = []
    for r in range(200):
        idx = np.repeat(np.arange(20), w[r].astype(int))
        loop.append(math.exp(num[idx].sum() / den[idx].sum()))
    assert e.low == pytest.approx(np.quantile(loop, 0.025)) and e.high == pytest.approx(np.quantile(loop, 0.975))
    # resamples=0 (evaluation.bootstrap: 0) asks for no interval: the value alone
    none = stats.bootstrap_ratio(num, den, "exp", resamples=0)
    assert none.value == e.value and none.n == 20 and all(math.isnan(x) for x in (none.stderr, none.low, none.high))


def test_paired_difference():
    rng = np.random.default_rng(2)
    a = {"num": rng.normal(0, 1, 40).tolist(), "den": [1.0] * 40}
    same = stats.paired_difference(a, a)
    assert same.diff == 0 and not same.significant
    shifted = {"num": (np.asarray(a["num"]) + 0.5).tolist(), "den": [1.0] * 40}
    d = stats.paired_difference(a, shifted)
    assert d.diff == pytest.approx(0.5) and d.significant and d.low == pytest.approx(0.5)
    # noise much larger than the shift, on independent draws: inside the noise
    noisy = {"num": (rng.normal(0, 5, 40) + 0.1).tolist(), "den": [1.0] * 40}
    assert not stats.paired_difference(a, noisy).significant
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_difference(a, {"num": [1.0], "den": [1.0]})
    unpaired = stats.paired_difference(a, shifted, resamples=0)
    assert unpaired.diff == pytest.approx(0.5) and not unpaired.significant and math.isnan(unpaired.low)


def test_head_scores_per_example_and_interval(tmp_path):
    """example_masked [L, H, N] equals a loop of full forwards with one head masked, summed per
    example; the interval equals the bootstrap computed by a plain loop; aggregates re-derive."""
    import jax.numpy as jnp

    make_hf_model(tmp_path / "m", "llama")
    model, params = capjax.load_pretrained(tmp_path / "m")
    rng = np.random.RandomState(0)
    N, T = 5, 10
    tokens = rng.randint(0, 101, (N, T))
    loss_mask = np.zeros((N, T), np.float32)
    for b in range(N):
        loss_mask[b, 3 + b % 3 :] = 1
    s = capjax.score_heads(model, params, tokens, loss_mask, subsets=1, progress=False, bootstrap=300)
    L, H = s.delta.shape
    for l, h in [(0, 1), (1, 3)]:
        mask = np.ones((L, H), np.float32)
        mask[l, h] = 0
        logits = model.apply({"params": params}, jnp.asarray(tokens), head_mask=jnp.asarray(mask))
        logp = np.asarray(jax_log_softmax(logits))
        nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * loss_mask[:, 1:]
        np.testing.assert_allclose(s.example_masked[l, h], nll.sum(1), rtol=2e-5)
    np.testing.assert_allclose(s.answer_count, loss_mask[:, 1:].sum(1))
    np.testing.assert_allclose(s.masked[0], s.example_masked.sum(-1) / s.answer_count.sum(), rtol=1e-6)
    w = stats.resample_weights(N, 300, 0)
    diff = s.example_masked - s.example_baseline
    boot = np.stack([(diff * w[r]).sum(-1) / (w[r] * s.answer_count).sum() for r in range(300)])
    np.testing.assert_allclose(s.interval, np.quantile(boot, [0.025, 0.975], axis=0), rtol=1e-9)
    paired = s.with_aggregate("paired")
    np.testing.assert_allclose(paired.delta, np.median(s.masked - s.baseline[:, None, None], axis=0))


def jax_log_softmax(logits):
    import jax

    return jax.nn.log_softmax(logits.astype("float32"), axis=-1)
