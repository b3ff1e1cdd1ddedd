"""capjax.ablation against PyTorch forward hooks on transformers models (each kind, each component,
each metric; GQA, Qwen2 biases, Mistral window; padded, packed and shared-prefix batches), and the
estimators from per-example results against score_heads."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import capjax
from capjax import estimators
from capjax.ablation import (
    ablate,
    ablation_spec,
    gradient_deltas,
    logits_metric,
    pairs_spec,
    prepare_batch,
    resample_pairing,
    single_spec,
    units,
)
from conftest import make_hf_model

ARCHS = {"llama_gqa": ("llama", {}), "qwen2_bias": ("qwen2", {}), "mistral_window": ("mistral", dict(sliding_window=4))}
L, H, D, E = 2, 4, 8, 32


@pytest.fixture(scope="module")
def archs(tmp_path_factory):
    """get(name) -> (name, hf, model, params), each architecture built once per module."""
    built = {}

    def get(name):
        if name not in built:
            kind, over = ARCHS[name]
            folder = tmp_path_factory.mktemp(name)
            # Larger weights than the 0.02 default, so that every ablation moves the loss far above float noise.
            hf = make_hf_model(folder, kind, initializer_range=0.2, **over)
            hf.config._attn_implementation = "eager"
            model, params = capjax.load_pretrained(folder)
            built[name] = (name, hf, model, params)
        return built[name]

    return get


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, archs):
    return archs(request.param)


@pytest.fixture
def llama_gqa(archs):
    return archs("llama_gqa")


@pytest.fixture
def qwen2_bias(archs):
    return archs("qwen2_bias")


@pytest.fixture
def mistral_window(archs):
    return archs("mistral_window")


def make_batch(which: str):
    """Right-padded [B, T] batches: 'padded' (one example per row), 'packed' (short examples that
    share rows), 'prefix' (a 7-token prefix every example starts with)."""
    rng = np.random.RandomState({"padded": 0, "packed": 1, "prefix": 2}[which])
    B, T = 5, 16
    tokens = rng.randint(0, 101, (B, T))
    lengths = [16, 12, 10, 15, 9] if which != "packed" else [12, 5, 6, 4, 7]
    starts = [9, 10, 8, 12, 8] if which != "packed" else [8, 2, 3, 2, 4]
    if which == "prefix":
        tokens[:, :7] = rng.randint(0, 101, 7)
    am = np.zeros((B, T), np.int32)
    loss = np.zeros((B, T), np.float32)
    for b in range(B):
        am[b, : lengths[b]] = 1
        loss[b, starts[b] : lengths[b]] = 1
    return tokens, loss, am


# ---------------------------------------------------------------------------- the torch oracle
def _capture(hf, tokens, am):
    """Intact outputs per layer: heads [B, T, H, D] (o_proj input), attn [B, T, E], mlp [B, T, E]."""
    out = {"heads": [], "attn": [], "mlp": []}
    handles = []
    for layer in hf.model.layers:
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a: out["heads"].append(a[0].detach().reshape(*a[0].shape[:2], H, D).clone())
            )
        )
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o: out["attn"].append(o[0].detach().clone())))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o: out["mlp"].append(o.detach().clone())))
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits
    finally:
        for h in handles:
            h.remove()
    return out, logits.double()


def _replacements(caps, kind, tokens, am, loss, perm):
    B, T = tokens.shape
    last = np.array([np.flatnonzero(loss[b] > 0).max() for b in range(B)])
    kept = (am > 0) & (np.arange(T)[None] <= last[:, None])
    reps = {}
    for name, per_layer in caps.items():
        reps[name] = []
        for a in per_layer:
            if kind == "zero":
                r = torch.zeros_like(a)
            elif kind == "mean":
                w = torch.tensor(kept, dtype=a.dtype).reshape(B, T, *([1] * (a.ndim - 2)))
                r = ((a * w).sum((0, 1)) / w.sum()).expand_as(a)
            else:  # example b at position t takes example perm[b] at min(t, its last kept position)
                idx = np.minimum(np.arange(T)[None], last[perm][:, None])
                r = a[torch.tensor(perm)[:, None], torch.tensor(idx)]
            reps[name].append(r)
    return reps


def torch_values(hf, tokens, am, loss, specs, kind, metric="ce", seed=0):
    """(values [N, B], intact [B]): the metric summed over each example's answer tokens, with hooks
    mixing each component's output with its replacement."""
    caps, intact_logits = _capture(hf, tokens, am)
    reps = _replacements(caps, kind, tokens, am, loss, resample_pairing(len(tokens), seed))
    sel = (loss[:, 1:] > 0) & (am[:, 1:] > 0) & (am[:, :-1] > 0)
    ref = torch.log_softmax(intact_logits[:, :-1], -1)

    def per_example(logits):
        logp = torch.log_softmax(logits[:, :-1], -1)
        tgt = torch.tensor(tokens[:, 1:])
        if metric == "ce":
            v = -logp.gather(-1, tgt[..., None])[..., 0]
        elif metric == "kl":
            v = (ref.exp() * (ref - logp)).sum(-1)
        else:  # margin: logit of the target minus the largest logit
            z = logits[:, :-1]
            v = z.gather(-1, tgt[..., None])[..., 0] - z.max(-1).values
        return (v.numpy() * sel).sum(1)

    values = []
    for n in range(len(specs["heads"])):
        handles = []
        for l, layer in enumerate(hf.model.layers):
            hm = torch.tensor(specs["heads"][n, l], dtype=torch.float32)[:, None]
            ka, km = float(specs["attn"][n, l]), float(specs["mlp"][n, l])

            def pre(m, a, l=l, hm=hm):
                x = a[0].reshape(*a[0].shape[:2], H, D)
                return ((x * hm + (1 - hm) * reps["heads"][l]).reshape(a[0].shape),) + tuple(a[1:])

            def attn(m, a, o, l=l, k=ka):
                return (k * o[0] + (1 - k) * reps["attn"][l],) + tuple(o[1:])

            def mlp(m, a, o, l=l, k=km):
                return k * o + (1 - k) * reps["mlp"][l]

            handles += [
                layer.self_attn.o_proj.register_forward_pre_hook(pre),
                layer.self_attn.register_forward_hook(attn),
                layer.mlp.register_forward_hook(mlp),
            ]
        try:
            with torch.no_grad():
                logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits.double()
        finally:
            for h in handles:
                h.remove()
        values.append(per_example(logits))
    return np.stack(values), per_example(intact_logits)


def mixed_spec(config, rng):
    """A single head, a single MLP block, a single attention block, and a random fractional mix of all."""
    spec = ablation_spec(config, 4)
    spec["heads"][0, 1, 2] = 0.0
    spec["mlp"][1, 0] = 0.0
    spec["attn"][2, 1] = 0.0
    spec["heads"][3] = rng.rand(L, H)
    spec["mlp"][3] = rng.rand(L)
    spec["attn"][3] = rng.rand(L)
    return spec


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_kinds_and_components_equal_torch_hooks(arch, kind):
    """Shared-prefix batch on each architecture (the prefix is stored once and packed)."""
    _, hf, model, params = arch
    tokens, loss, am = make_batch("prefix")
    batch = prepare_batch(model, tokens, loss, am)
    assert batch.packed.prefix_len == 7 and batch.packed.tokens.shape[0] < len(tokens)
    spec = mixed_spec(model.config, np.random.RandomState(0))
    res = ablate(model, params, batch, spec, kind=kind, chunk_size=3)
    want, intact = torch_values(hf, tokens, am, loss, spec, kind)
    assert res.values.shape == (4, 5)
    np.testing.assert_allclose(res.intact, intact, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(res.values, want, atol=2e-4, rtol=1e-5)
    # Every ablation moves the loss well above the tolerance, and the changes themselves agree.
    assert np.abs(want - intact).min() > 5e-3
    np.testing.assert_allclose(res.values - res.intact, want - intact, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("which,pack", [("padded", False), ("packed", True)])
@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_padded_and_packed_batches(llama_gqa, which, pack, kind):
    _, hf, model, params = llama_gqa
    tokens, loss, am = make_batch(which)
    batch = prepare_batch(model, tokens, loss, am, pack=pack)
    if pack:
        assert batch.packed.tokens.shape[0] < len(tokens)
    spec = mixed_spec(model.config, np.random.RandomState(1))
    res = ablate(model, params, batch, spec, kind=kind, seed=3)
    want, intact = torch_values(hf, tokens, am, loss, spec, kind, seed=3)
    np.testing.assert_allclose(res.values, want, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(res.intact, intact, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("metric", ["kl", "margin"])
def test_metrics_equal_torch(qwen2_bias, metric):
    _, hf, model, params = qwen2_bias
    tokens, loss, am = make_batch("prefix")
    batch = prepare_batch(model, tokens, loss, am)
    spec = mixed_spec(model.config, np.random.RandomState(2))
    m = (
        "kl"
        if metric == "kl"
        else logits_metric(lambda z, y: jnp.take_along_axis(z, y[:, None], -1)[:, 0] - z.max(-1), "margin")
    )
    res = ablate(model, params, batch, spec, kind="mean", metric=m)
    want, intact = torch_values(hf, tokens, am, loss, spec, "mean", metric)
    np.testing.assert_allclose(res.values, want, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(res.intact, intact, atol=2e-4)
    if metric == "kl":
        assert np.all(want > 1e-4)


def test_estimators_from_per_example_equal_score_heads(llama_gqa):
    _, hf, model, params = llama_gqa
    tokens, loss, am = make_batch("prefix")
    batch = prepare_batch(model, tokens, loss, am)
    res = ablate(model, params, batch, single_spec(model.config, "heads"))
    for aggregate in ("median", "mean", "paired"):
        scores = capjax.score_heads(
            model, params, tokens, loss, subsets=3, aggregate=aggregate, attention_mask=am, progress=False
        )
        got = estimators.estimate(aggregate, res.values, res.intact, res.count, subsets=3).reshape(L, H)
        np.testing.assert_allclose(got, scores.delta, atol=1e-5)
        masked, baseline = estimators.subset_losses(res.values, res.intact, res.count, 3)
        np.testing.assert_allclose(masked.reshape(3, L, H), scores.masked, atol=1e-5)
        np.testing.assert_allclose(baseline, scores.baseline, atol=1e-5)
    # head_ablation_losses keeps its per-example losses on request: the same [N, B].
    per_ex = capjax.head_ablation_losses(
        model, params, tokens, loss, single_spec(model.config)["heads"], am, per_example=True
    )
    np.testing.assert_allclose(per_ex, res.values, atol=1e-4)
    # score_heads takes any registered estimator as its aggregate.
    boot_scores = capjax.score_heads(
        model, params, tokens, loss, subsets=3, aggregate="bootstrap", attention_mask=am, progress=False
    )
    np.testing.assert_allclose(
        boot_scores.delta.ravel(), estimators.estimate("bootstrap", res.values, res.intact, res.count), atol=1e-5
    )
    # bootstrap against a plain loop over the draws
    boot = estimators.estimate("bootstrap", res.values, res.intact, res.count, resamples=7, seed=4)
    rng = np.random.default_rng(4)
    draws = [rng.integers(0, 5, 5) for _ in range(7)]
    loop = np.mean(
        [[(res.values[n, d].sum() - res.intact[d].sum()) / res.count[d].sum() for n in range(L * H)] for d in draws],
        axis=0,
    )
    np.testing.assert_allclose(boot, loop, atol=1e-12)
    with pytest.raises(ValueError, match="registered: median, mean, paired, bootstrap"):
        estimators.estimate("trimmed", res.values, res.intact, res.count)


def test_pairs_interactions_and_gradient(mistral_window):
    _, hf, model, params = mistral_window
    tokens, loss, am = make_batch("prefix")
    batch = prepare_batch(model, tokens, loss, am)
    sel = units(model.config, "heads")[:3] + units(model.config, "mlp")[:1]
    spec, pairs = pairs_spec(model.config, sel)
    assert len(pairs) == 6 and spec["heads"][3].sum() == L * H - 2  # heads (0,0)&(0,1)... pair index 3: head + mlp
    res = ablate(model, params, batch, spec, kind="zero")
    want, _ = torch_values(hf, tokens, am, loss, spec, "zero")
    np.testing.assert_allclose(res.values, want, atol=2e-4, rtol=1e-5)
    # Gradient of the per-example loss w.r.t. each MLP / head keep, against torch autograd.
    g = gradient_deltas(model, params, batch)
    keeps = {"mlp": torch.ones(L, requires_grad=True), "heads": torch.ones(L, H, requires_grad=True)}
    handles = []
    for l, layer in enumerate(hf.model.layers):
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, l=l: keeps["mlp"][l] * o))
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, l=l: (
                    (a[0].reshape(*a[0].shape[:2], H, D) * keeps["heads"][l][:, None]).reshape(a[0].shape),
                )
            )
        )
    try:
        logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits.double()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, torch.tensor(tokens[:, 1:])[..., None])[..., 0]
    sel_t = torch.tensor((loss[:, 1:] > 0) & (am[:, 1:] > 0) & (am[:, :-1] > 0), dtype=torch.float64)
    per_ex = (nll * sel_t).sum(1)
    for b in range(len(tokens)):
        gm, gh = torch.autograd.grad(per_ex[b], [keeps["mlp"], keeps["heads"]], retain_graph=True)
        np.testing.assert_allclose(g["mlp"][b], -gm.numpy(), atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(g["heads"][b], -gh.numpy(), atol=2e-4, rtol=1e-4)


def test_bad_inputs_are_one_clear_line(llama_gqa):
    _, _, model, params = llama_gqa
    with pytest.raises(ValueError, match=r"'mlp' must have shape \[1, 2\]"):
        ablation_spec(model.config, 1, mlp=np.ones((1, 3)))
    tokens, loss, am = make_batch("padded")
    batch = prepare_batch(model, tokens, loss, am)
    with pytest.raises(ValueError, match="unknown ablation kind 'noise'"):
        ablate(model, params, batch, single_spec(model.config, "mlp"), kind="noise")
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        ablate(model, params, batch, single_spec(model.config, "mlp"), metric="acc")
