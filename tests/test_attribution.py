"""Head attribution against independent oracles: a Python loop of forwards, and PyTorch with o_proj hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import capjax
from capjax import attribution, packing
from capjax.attribution import aggregate_scores, head_ablation_losses, score_heads
from conftest import make_hf_model, torch_subset_losses

B, T = 7, 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    hf = make_hf_model(folder, "llama", num_hidden_layers=3)
    model, params = capjax.load_pretrained(folder)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 101, (B, T))
    attention_mask = np.ones((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    for b in range(B):  # prompts of different lengths, answers to the end, some right padding
        length = T - (b % 3)
        attention_mask[b, length:] = 0
        loss_mask[b, 4 + b % 4 : length] = 1
    return hf, model, params, tokens, loss_mask, attention_mask


def single_head_masks(L, H):
    masks = np.ones((L * H, L, H), np.float32)
    for i in range(L * H):
        masks[i].reshape(-1)[i] = 0.0
    return masks


def _data(tiny, which):
    """The fixture's batch (one example per row), short examples that pack two or three per row, or
    short examples with a shared prefix."""
    hf, model, params, tokens, loss_mask, am = tiny
    if which == "packed":
        tokens, loss_mask, am = _short_examples(np.random.RandomState(2))
    elif which == "prefix":
        tokens, loss_mask, am = _prefixed_examples(np.random.RandomState(2))
        assert len(packing.pack_examples(tokens, loss_mask, am).prefix) == 9
    elif which == "beside_prefix":  # short suffixes fill row 0 after the prefix
        rng = np.random.RandomState(7)
        tokens = np.concatenate([np.tile(rng.randint(0, 101, 10), (3, 1)), rng.randint(0, 101, (3, 20))], axis=1)
        am = np.ones(tokens.shape, np.int32)
        am[1, 15:], am[2, 14:] = 0, 0
        loss_mask = np.zeros(tokens.shape, np.float32)
        loss_mask[0, 12:], loss_mask[1, 12:15], loss_mask[2, 11:14] = 1, 1, 1
        packed = packing.pack_examples(tokens, loss_mask, am)
        np.testing.assert_array_equal(packed.segment_ids[0], [-1] * 10 + [2] * 5 + [3] * 4 + [0])
        assert packed.tokens.shape == (2, 20)
    return hf, model, params, tokens, loss_mask, am


@pytest.mark.parametrize("which", ["fixture", "packed", "prefix", "beside_prefix"])
def test_vmapped_losses_equal_python_loop(tiny, which):
    _, model, params, tokens, loss_mask, am = _data(tiny, which)
    rng = np.random.RandomState(3)
    masks = np.concatenate([single_head_masks(3, 4), rng.rand(5, 3, 4).astype(np.float32)])
    losses = head_ablation_losses(model, params, tokens, loss_mask, masks, am, chunk_size=4)
    for mask, loss in zip(masks, losses):
        logits = np.asarray(model.apply({"params": params}, tokens, head_mask=mask, attention_mask=am), np.float64)
        logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        expected = (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        assert loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("aggregate", ["median", "mean", "paired"])
def test_score_heads_equals_pytorch_reference(tiny, aggregate):
    hf, model, params, tokens, loss_mask, am = tiny
    K = 3
    scores = score_heads(
        model, params, tokens, loss_mask, subsets=K, aggregate=aggregate, attention_mask=am, progress=False
    )
    baseline = torch_subset_losses(hf, tokens, loss_mask, am, K)
    masked = np.stack(
        [torch_subset_losses(hf, tokens, loss_mask, am, K, m) for m in single_head_masks(3, 4)], axis=1
    ).reshape(K, 3, 4)
    np.testing.assert_allclose(scores.baseline, baseline, atol=1e-5)
    np.testing.assert_allclose(scores.masked, masked, atol=1e-5)
    if aggregate == "median":
        expected = np.median(masked, 0) - baseline.mean()
    elif aggregate == "mean":
        expected = masked.mean(0) - baseline.mean()
    else:
        expected = np.median(masked - baseline[:, None, None], 0)
    np.testing.assert_allclose(scores.delta, expected, atol=1e-5)
    assert scores.delta.shape == (3, 4) and scores.masked.shape == (K, 3, 4) and scores.baseline.shape == (K,)


def test_aggregates_by_hand():
    masked = np.array([[[1.0]], [[5.0]], [[2.0]]])
    baseline = np.array([0.5, 4.0, 1.5])
    assert aggregate_scores(masked, baseline, "median")[0, 0] == pytest.approx(2.0 - 2.0)
    assert aggregate_scores(masked, baseline, "mean")[0, 0] == pytest.approx(8 / 3 - 2.0)
    assert aggregate_scores(masked, baseline, "paired")[0, 0] == pytest.approx(0.5)


def test_prefix_reuse_and_answer_only_equal_naive_path(tiny):
    _, model, params, tokens, loss_mask, am = tiny
    masks = single_head_masks(3, 4)
    naive = head_ablation_losses(model, params, tokens, loss_mask, masks, am, answer_only=False, chunk_size=12)
    answer_only = head_ablation_losses(model, params, tokens, loss_mask, masks, am, answer_only=True, chunk_size=5)
    prefix = score_heads(model, params, tokens, loss_mask, subsets=1, attention_mask=am, progress=False)
    np.testing.assert_allclose(answer_only, naive, atol=1e-5)
    np.testing.assert_allclose(prefix.masked[0].reshape(-1), naive, atol=1e-5)


def test_positions_after_the_last_answer_token_are_cut_exactly(tiny):
    hf, model, params, tokens, loss_mask, am = tiny
    extra = 6  # two real tokens after every answer (an end-of-turn), then padding
    rng = np.random.RandomState(5)
    tokens_x = np.concatenate([tokens, rng.randint(0, 101, (B, extra))], axis=1)
    am_x = np.concatenate([am, np.zeros((B, extra), np.int32)], axis=1)
    for b in range(B):
        am_x[b, am[b].sum() : am[b].sum() + 2] = 1
    loss_x = np.concatenate([loss_mask, np.zeros((B, extra), np.float32)], axis=1)
    _, cut_tokens, _, _ = attribution._check_calibration(model, tokens_x, loss_x, am_x)
    assert cut_tokens.shape == (B, T)  # the last answer token is at T - 1
    scores = score_heads(model, params, tokens_x, loss_x, subsets=3, attention_mask=am_x, progress=False)
    masked = np.stack(
        [torch_subset_losses(hf, tokens_x, loss_x, am_x, 3, m) for m in single_head_masks(3, 4)], axis=1
    ).reshape(3, 3, 4)
    np.testing.assert_allclose(scores.baseline, torch_subset_losses(hf, tokens_x, loss_x, am_x, 3), atol=1e-5)
    np.testing.assert_allclose(scores.masked, masked, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_chunk_size_does_not_change_scores(tiny, chunk_size):
    _, model, params, tokens, loss_mask, am = tiny
    ref = score_heads(model, params, tokens, loss_mask, attention_mask=am, chunk_size=4, progress=False)
    got = score_heads(model, params, tokens, loss_mask, attention_mask=am, chunk_size=chunk_size, progress=False)
    np.testing.assert_allclose(got.masked, ref.masked, atol=1e-6)


def test_progress_bar_reaches_every_layer_and_changes_no_score(tiny, capsys):
    """score_heads(progress=True): the bar, ticked from inside the compiled layer scan, reaches L of L
    layers; the scores equal those without it."""
    _, model, params, tokens, loss_mask, am = tiny
    L, H = model.config.num_layers, model.config.num_heads
    ref = score_heads(model, params, tokens, loss_mask, attention_mask=am, progress=False)
    assert "scoring" not in capsys.readouterr().err
    got = score_heads(model, params, tokens, loss_mask, attention_mask=am, progress=True)
    np.testing.assert_array_equal(got.masked, ref.masked)
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert f"scoring {L * H} heads: 100%" in bar and f"{L}/{L}" in bar, bar


@pytest.mark.parametrize("which", ["fixture", "packed", "prefix"])
def test_gradient_method_equals_torch_autograd(tiny, which):
    hf, model, params, tokens, loss_mask, am = _data(tiny, which)
    K = 2
    scores = score_heads(model, params, tokens, loss_mask, subsets=K, method="gradient", attention_mask=am)
    D = hf.config.hidden_size // hf.config.num_attention_heads
    mask = torch.ones(3, 4, dtype=torch.float32, requires_grad=True)
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, l=l: (args[0] * mask[l].repeat_interleave(D),)
        )
        for l, layer in enumerate(hf.model.layers)
    ]
    logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits
    for h in handles:
        h.remove()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, torch.tensor(tokens[:, 1:, None]))[..., 0] * torch.tensor(loss_mask[:, 1:])
    for k, g in enumerate(np.array_split(np.arange(B), K)):
        loss = nll[g].sum() / loss_mask[g, 1:].sum()
        (grad,) = torch.autograd.grad(loss, mask, retain_graph=True)
        np.testing.assert_allclose(scores.baseline[k] - scores.masked[k], grad.numpy(), atol=1e-5)


def test_resume_after_interruption(tiny, tmp_path, monkeypatch):
    _, model, params, tokens, loss_mask, am = tiny
    full = score_heads(model, params, tokens, loss_mask, attention_mask=am, progress=False)
    real = attribution._single_head_nll
    calls = []

    def dies_on_second_group(*args, **kwargs):
        calls.append(args[5])  # start layer
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "_single_head_nll", dies_on_second_group)
    with pytest.raises(KeyboardInterrupt):
        score_heads(
            model,
            params,
            tokens,
            loss_mask,
            attention_mask=am,
            checkpoint_dir=tmp_path,
            layers_per_call=1,
            progress=False,
        )
    calls.clear()
    monkeypatch.setattr(attribution, "_single_head_nll", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    resumed = score_heads(
        model, params, tokens, loss_mask, attention_mask=am, checkpoint_dir=tmp_path, layers_per_call=1, progress=False
    )
    assert calls == [1, 2]  # layer group 0 came from the checkpoint
    np.testing.assert_array_equal(resumed.masked, full.masked)
    np.testing.assert_array_equal(resumed.delta, full.delta)
    # Different calibration data must not reuse those checkpoints.
    calls.clear()
    score_heads(
        model,
        params,
        tokens[::-1].copy(),
        loss_mask[::-1].copy(),
        attention_mask=am[::-1].copy(),
        checkpoint_dir=tmp_path,
        layers_per_call=1,
        progress=False,
    )
    assert calls == [0, 1, 2]


def test_head_scores_save_load(tiny, tmp_path):
    _, model, params, tokens, loss_mask, am = tiny
    s = score_heads(model, params, tokens, loss_mask, attention_mask=am, aggregate="paired", progress=False)
    s.save(tmp_path / "s.npz", n=B)
    r = attribution.HeadScores.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(r.delta, s.delta)
    assert r.aggregate == "paired"


def test_bad_inputs(tiny):
    _, model, params, tokens, loss_mask, am = tiny
    with pytest.raises(ValueError, match="empty calibration set"):
        score_heads(model, params, tokens[:0], loss_mask[:0])
    with pytest.raises(ValueError, match="subsets=9 is larger than the calibration set"):
        score_heads(model, params, tokens, loss_mask, subsets=9, attention_mask=am)
    no_answer_first = loss_mask.copy()
    no_answer_first[:3] = 0
    with pytest.raises(ValueError, match="subset 0 .* has no answer tokens"):
        score_heads(model, params, tokens, no_answer_first, subsets=3, attention_mask=am)
    with pytest.raises(ValueError, match="no answer tokens"):
        score_heads(model, params, tokens, np.zeros_like(loss_mask), attention_mask=am)
    with pytest.raises(ValueError, match=r"masks must be \[N, L, H\] = \[N, 3, 4\]"):
        head_ablation_losses(model, params, tokens, loss_mask, np.ones((2, 4, 3)), am)
    with pytest.raises(ValueError, match="unknown aggregate"):
        score_heads(model, params, tokens, loss_mask, aggregate="max")
    nan_params = dict(params, norm={"scale": params["norm"]["scale"] * np.nan})
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        score_heads(model, nan_params, tokens, loss_mask, attention_mask=am, progress=False)


def _short_examples(rng, B=7, T=24):
    """Examples of 6..12 real tokens in rows of 24 (right padding): two or three fit in one row."""
    tokens = rng.randint(0, 101, (B, T))
    am = np.zeros((B, T), np.int32)
    loss = np.zeros((B, T), np.float32)
    for b in range(B):
        n = 6 + (b * 5) % 7
        am[b, :n] = 1
        loss[b, 3 : n - (b % 2)] = 1  # some examples end with a non-answer token
    return tokens, loss, am


def _prefixed_examples(rng, B=7, T=26, Pf=9):
    """Short examples that all start with the same Pf tokens (a chat template's system prompt),
    answers after it, right padding and one left-padded row."""
    tokens, loss, am = _short_examples(rng, B, T - Pf)
    tokens = np.concatenate([np.broadcast_to(rng.randint(0, 101, Pf), (B, Pf)), tokens], axis=1)
    loss = np.concatenate([np.zeros((B, Pf), np.float32), loss], axis=1)
    am = np.concatenate([np.ones((B, Pf), np.int32), am], axis=1)
    n = am[0].sum()  # left-pad row 0
    for a in (tokens, loss, am):
        a[0] = np.roll(a[0], T - n)
    return tokens, loss, am


def test_pack_examples_keeps_every_answer_token_in_its_segment():
    tokens, loss, am = _short_examples(np.random.RandomState(1))
    packed = packing.pack_examples(tokens, loss, am)
    assert packed.tokens.shape[0] < len(tokens)  # something was packed
    for b in range(len(tokens)):
        last = np.flatnonzero(loss[b]).max()
        where = np.argwhere(packed.segment_ids == b + 1)
        assert len(np.unique(where[:, 0])) == 1  # one row, contiguous, in order
        r, cols = where[0, 0], where[:, 1]
        np.testing.assert_array_equal(cols, np.arange(cols[0], cols[0] + last + 1))
        np.testing.assert_array_equal(packed.tokens[r, cols], tokens[b, : last + 1])
        np.testing.assert_array_equal(packed.positions[r, cols], np.arange(last + 1))
        np.testing.assert_array_equal(packed.loss_mask[r, cols[1:]], loss[b, 1 : last + 1])
    plain = attribution.answer_positions(tokens, loss, am)
    packed_ans = attribution.answer_positions(
        packed.tokens, packed.loss_mask, segment_ids=packed.segment_ids, num_examples=len(tokens)
    )
    np.testing.assert_array_equal(packed_ans.count, plain.count)
    np.testing.assert_array_equal(np.sort(packed_ans.target), np.sort(plain.target))


@pytest.mark.parametrize(
    "model_type, overrides, pack, examples",
    [
        ("llama", {}, True, _short_examples),
        ("llama", {}, False, _short_examples),
        ("mistral", {"sliding_window": 4}, True, _short_examples),
        ("llama", {}, True, _prefixed_examples),
        ("mistral", {"sliding_window": 4}, True, _prefixed_examples),
        ("qwen2", {}, True, _prefixed_examples),
    ],
)
def test_packed_scoring_equals_pytorch_on_padded_rows(tmp_path, model_type, overrides, pack, examples):
    hf = make_hf_model(tmp_path, model_type, num_hidden_layers=2, **overrides)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, loss, am = examples(np.random.RandomState(2))
    if examples is _prefixed_examples:
        assert len(packing.pack_examples(tokens, loss, am).prefix) == 9  # window 4 < the prefix
    scores = score_heads(model, params, tokens, loss, subsets=3, attention_mask=am, progress=False, pack=pack)
    masked = np.stack(
        [torch_subset_losses(hf, tokens, loss, am, 3, m) for m in single_head_masks(2, 4)], axis=1
    ).reshape(3, 2, 4)
    np.testing.assert_allclose(scores.masked, masked, atol=1e-5)
    np.testing.assert_allclose(scores.baseline, torch_subset_losses(hf, tokens, loss, am, 3), atol=1e-5)


def test_pack_examples_stores_the_shared_prefix_once():
    rng = np.random.RandomState(4)
    tokens, loss, am = _prefixed_examples(rng)
    packed = packing.pack_examples(tokens, loss, am)
    kept = packing.kept_tokens(am, loss)
    np.testing.assert_array_equal(packed.prefix, tokens[1, :9])
    np.testing.assert_array_equal(packed.segment_ids[0], [-1] * 9 + [0] * (packed.tokens.shape[1] - 9))
    np.testing.assert_array_equal(packed.positions[0, :9], np.arange(9))
    for b in range(len(tokens)):  # each segment is the example after the prefix, at positions 9...
        where = np.argwhere(packed.segment_ids == b + 1)
        r, cols = where[0, 0], where[:, 1]
        np.testing.assert_array_equal(np.concatenate([packed.prefix, packed.tokens[r, cols]]), tokens[b, kept[b]])
        np.testing.assert_array_equal(packed.positions[r, cols], 9 + np.arange(len(cols)))
    plain = attribution.answer_positions(tokens, loss, am)
    packed_ans = attribution.answer_positions(
        packed.tokens, packed.loss_mask, segment_ids=packed.segment_ids, num_examples=len(tokens)
    )
    np.testing.assert_array_equal(packed_ans.count, plain.count)  # no answer token lost to the prefix

    early = loss.copy()
    early[3, kept[3][5]] = 1  # an answer token at index 5 -> its predictor (4) must stay in the rows
    assert len(packing.pack_examples(tokens, early, am).prefix) == 4
    assert len(packing.pack_examples(tokens, loss, am, share_prefix=False).prefix) == 0
    for rest, shared in ((30, 3), (100, 0)):  # 3 x 3 tokens saved: 6.8% of 132, 2.2% of 412
        toks = np.concatenate([np.tile([5, 6, 7], (4, 1)), rng.randint(0, 101, (4, rest))], axis=1)
        ans = np.zeros(toks.shape, np.float32)
        ans[:, -5:] = 1
        assert packing.MIN_PREFIX_SAVING == 0.05
        assert len(packing.pack_examples(toks, ans).prefix) == shared


def test_shared_prefix_scores_equal_unshared(tiny):
    _, model, params, *_ = tiny
    tokens, loss, am = _prefixed_examples(np.random.RandomState(6))
    shared = score_heads(model, params, tokens, loss, attention_mask=am, progress=False)
    alone = score_heads(model, params, tokens, loss, attention_mask=am, progress=False, share_prefix=False)
    np.testing.assert_allclose(shared.masked, alone.masked, atol=1e-5)
    np.testing.assert_allclose(shared.baseline, alone.baseline, atol=1e-5)
