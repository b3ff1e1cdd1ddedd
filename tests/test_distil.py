"""Logit distillation in recovery (`capjax.recover(..., teacher=(model, params))`): the loss against
a PyTorch computation on transformers' models, and the teacher never updated."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import capjax
from capjax.recovery.train import Distillation, batch_loss
from conftest import make_hf_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 3-layer teacher and a smaller 2-layer student (fewer heads, narrower MLP), same vocabulary."""
    root = tmp_path_factory.mktemp("distil")
    hf_t = make_hf_model(root / "t", "llama", num_hidden_layers=3, initializer_range=0.2)
    hf_s = make_hf_model(
        root / "s",
        "llama",
        seed=1,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=24,
        initializer_range=0.2,
    )
    teacher, student = capjax.load_pretrained(root / "t"), capjax.load_pretrained(root / "s")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 101, (5, 10)).astype(np.int32)
    am = np.ones_like(tokens)
    am[1, 7:] = 0
    am[3, 4:] = 0
    loss_mask = am.astype(np.float32)
    loss_mask[:, :3] = 0  # the loss reads tokens 3.. of each example
    loss_mask[2, 8:] = 0  # example 2's answer ends before its text: training keeps its tokens up to 7
    return hf_t, hf_s, teacher, student, {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": am}


@pytest.mark.parametrize(
    "temperature,ce_weight,positions", [(1.0, 0.0, "all"), (2.0, 0.5, "all"), (1.0, 0.0, "loss"), (2.0, 0.5, "loss")]
)
def test_distillation_loss_matches_pytorch(pair, temperature, ce_weight, positions):
    """positions="all": T^2 KL averaged over every position predicting a real token of its example
    (question and answer) + ce_weight x the answer tokens' mean NLL; "loss": both at the answer
    tokens only, one mean."""
    hf_t, hf_s, (t_model, t_params), (s_model, s_params), data = pair
    distil = Distillation(t_model, temperature, ce_weight, positions)
    got = batch_loss(s_model, s_params, data, distil=distil, teacher=t_params, rows_per_call=2)
    total, count = 0.0, 0
    kl_sum, kl_count, ce_sum = 0.0, 0, 0.0
    for b in range(data["tokens"].shape[0]):
        n = int(np.flatnonzero(data["loss_mask"][b])[-1]) + 1  # real tokens up to the last answer token
        assert n <= int(data["attention_mask"][b].sum())
        ids = torch.as_tensor(data["tokens"][b : b + 1, :n], dtype=torch.long)
        with torch.no_grad():
            zs, zt = hf_s(ids).logits[0, :-1].double(), hf_t(ids).logits[0, :-1].double()
        kl = (
            F.kl_div(
                F.log_softmax(zs / temperature, -1),
                F.log_softmax(zt / temperature, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            * temperature**2
        )
        ce = F.cross_entropy(zs, ids[0, 1:], reduction="none")
        w = torch.as_tensor(data["loss_mask"][b, 1:n], dtype=torch.float64)
        total += float(((kl + ce_weight * ce) * w).sum())
        count += int(w.sum())
        kl_sum, kl_count, ce_sum = kl_sum + float(kl.sum()), kl_count + n - 1, ce_sum + float((ce * w).sum())
    want = total / count if positions == "loss" else kl_sum / kl_count + ce_weight * ce_sum / count
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_recover_with_teacher_trains_the_student_only(pair):
    _, _, (t_model, t_params), (s_model, s_params), data = pair
    before_t = jax.tree.map(np.array, t_params)
    before_s = jax.tree.map(np.array, s_params)
    distil = Distillation(t_model, 2.0, 0.0)
    start = batch_loss(s_model, s_params, data, distil=distil, teacher=t_params)
    out, history = capjax.recover(
        s_model,
        s_params,
        None,
        data,
        teacher=(t_model, t_params),
        temperature=2.0,
        steps=8,
        lr=3e-3,
        warmup_steps=0,
        batch_size=5,
        mode="full",
        progress=False,
    )
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, t_params), before_t)  # teacher untouched
    assert history["distil"] == {"temperature": 2.0, "ce_weight": 0.0, "positions": "all"}
    np.testing.assert_allclose(history["loss"][0], start, rtol=1e-5)  # step 1 reports the distillation loss
    end = batch_loss(s_model, out, data, distil=distil, teacher=t_params)
    assert end < 0.8 * start
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(before_s)))


def test_teacher_with_another_vocabulary_is_refused(pair, tmp_path):
    _, _, _, (s_model, s_params), data = pair
    make_hf_model(tmp_path, "llama", vocab_size=120)
    other = capjax.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="teacher vocab_size 120 != student 101"):
        capjax.recover(s_model, s_params, None, data, teacher=other, steps=1, progress=False)


def test_micro_batches_average_over_the_whole_step(pair):
    """With 5 micro-batches of one row each (different numbers of KL and answer positions), the
    first step's reported loss is the whole batch's loss: both means are over the step, not per row."""
    _, _, (t_model, t_params), (s_model, s_params), data = pair
    want = batch_loss(s_model, s_params, data, distil=Distillation(t_model, 2.0, 0.5), teacher=t_params)
    _, history = capjax.recover(
        s_model,
        s_params,
        None,
        data,
        teacher=(t_model, t_params),
        temperature=2.0,
        ce_weight=0.5,
        steps=1,
        batch_size=5,
        grad_accum=5,
        mode="full",
        progress=False,
    )
    np.testing.assert_allclose(history["loss"][0], want, rtol=1e-5)


def test_unknown_distillation_positions_are_refused(pair):
    from capjax.recovery.settings import RecoverySettings, RecoverySettingsError

    with pytest.raises(RecoverySettingsError, match=r"recovery.distil_positions='answer': use all .* or loss"):
        RecoverySettings(distil_positions="answer")
    _, _, teacher, (s_model, s_params), data = pair
    with pytest.raises(ValueError, match="distil_positions='answer': use one of all, loss"):
        capjax.recover(
            s_model, s_params, None, data, teacher=teacher, distil_positions="answer", steps=1, progress=False
        )
