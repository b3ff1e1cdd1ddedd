"""The single-head layer scan (`capjax.ablation.single_unit_values`) under every kind and metric:
score_heads(kind=, metric=) and ablate(single_spec) against the general vmapped path (no prefix
reuse) and against PyTorch forward hooks (test_ablation's oracle), on a tiny GQA model."""

from __future__ import annotations

import numpy as np
import pytest

import capjax
from capjax.ablation import ablate, prepare_batch, single_spec
from conftest import make_hf_model
from test_ablation import H, L, make_batch, torch_values


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single_units")
    hf = make_hf_model(folder, "llama", initializer_range=0.2)
    hf.config._attn_implementation = "eager"
    model, params = capjax.load_pretrained(folder)
    return hf, model, params


@pytest.mark.parametrize("kind,metric", [("mean", "kl"), ("resample", "kl"), ("resample", "ce")])
def test_score_heads_kinds_and_metrics_equal_ablate_and_torch(tiny, kind, metric):
    hf, model, params = tiny
    tokens, loss, am = make_batch("prefix")
    batch = prepare_batch(model, tokens, loss, am)
    spec = single_spec(model.config, "heads")
    general = ablate(model, params, batch, spec, kind=kind, metric=metric, reuse_prefix=False)  # vmapped, no scan
    fast = ablate(model, params, batch, spec, kind=kind, metric=metric)  # the layer scan
    scores = capjax.score_heads(
        model,
        params,
        tokens,
        loss,
        subsets=1,
        aggregate="mean",
        attention_mask=am,
        progress=False,
        kind=kind,
        metric=metric,
        chunk_size=3,
    )
    want, intact = torch_values(hf, tokens, am, loss, spec, kind, metric)
    np.testing.assert_allclose(general.values, want, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(fast.values, general.values, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scores.example_masked.reshape(L * H, -1), general.values, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scores.example_baseline, intact, atol=2e-4)
    np.testing.assert_allclose(scores.delta.ravel(), general.delta(), atol=1e-5)
    assert np.abs(want - intact).min() > 1e-4  # every ablation moves the metric


def test_fractional_single_spec_takes_the_scan_and_equals_torch(tiny):
    hf, model, params = tiny
    tokens, loss, am = make_batch("prefix")
    batch = prepare_batch(model, tokens, loss, am)
    spec = single_spec(model.config, "heads", 0.25)
    fast = ablate(model, params, batch, spec, kind="mean")
    general = ablate(model, params, batch, spec, kind="mean", reuse_prefix=False)
    want, _ = torch_values(hf, tokens, am, loss, spec, "mean")
    np.testing.assert_allclose(fast.values, want, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(fast.values, general.values, atol=1e-5, rtol=1e-5)


def test_zero_ce_default_is_unchanged_and_gradient_takes_kinds(tiny):
    _, model, params = tiny
    tokens, loss, am = make_batch("prefix")
    default = capjax.score_heads(model, params, tokens, loss, subsets=2, attention_mask=am, progress=False)
    named = capjax.score_heads(
        model, params, tokens, loss, subsets=2, attention_mask=am, progress=False, kind="zero", metric="ce"
    )
    np.testing.assert_array_equal(named.example_masked, default.example_masked)
    per_ex = capjax.head_ablation_losses(
        model, params, tokens, loss, single_spec(model.config)["heads"], am, per_example=True
    )  # the general vmapped path
    np.testing.assert_allclose(default.example_masked.reshape(L * H, -1), per_ex, atol=1e-5)
    # First-order scores under mean ablation against a finite difference of forward passes.
    grad = capjax.score_heads(
        model, params, tokens, loss, subsets=1, aggregate="mean", method="gradient", attention_mask=am, kind="mean"
    )
    eps = 1e-2
    batch = prepare_batch(model, tokens, loss, am)
    near = ablate(model, params, batch, single_spec(model.config, "heads", 1 - eps), kind="mean", reuse_prefix=False)
    np.testing.assert_allclose(grad.delta.ravel(), near.delta() / eps, atol=2e-3, rtol=5e-2)
    with pytest.raises(ValueError, match="unknown ablation kind 'noise'"):
        capjax.score_heads(model, params, tokens, loss, kind="noise")
