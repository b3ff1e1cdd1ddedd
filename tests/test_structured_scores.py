"""Structured scores (capjax.structured.scores) against independent computations: the channel
gradient against finite differences of the masked model's loss, Minitron's activations and
ShortGPT's block influence against transformers' PyTorch model (hooks), and CAP's block ablation
against actually removing the layer (shrink) and computing the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import capjax
from capjax.structured import choose, shrink, target_shape
from capjax.structured.scores import (
    answer_loss,
    channel_activation_scores,
    channel_gradient_scores,
    layer_ablation_scores,
    layer_influence_scores,
)
from conftest import make_hf_model, padded_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    hf = make_hf_model(folder, "llama", randomize_norms=True, num_hidden_layers=3, initializer_range=0.1)
    model, params = capjax.load_pretrained(folder)
    tokens, am = padded_tokens(B=4, T=12)
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, 5:] = am[:, 5:]  # answers: every real token from position 5 on
    return hf, model, params, tokens, loss_mask, am


def _loss_from_logits(logits, tokens, loss_mask):
    """Plain answer NLL per answer token from full logits [B, T, V] (float64)."""
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    b, t = np.nonzero(loss_mask[:, 1:] > 0)
    return -lp[b, t, tokens[b, t + 1]].mean()


def test_channel_gradient_equals_finite_differences(tiny):
    _, model, params, tokens, loss_mask, am = tiny
    c = model.config
    grad_scores = channel_gradient_scores(model, params, tokens, loss_mask, am, batch_size=3)  # 2 chunks
    assert grad_scores.shape == (c.num_layers, c.intermediate_size)
    eps = 1e-2
    for l, f in [(0, 3), (1, 17), (2, 40)]:
        vals = []
        for m in (1 - eps, 1 + eps):
            mask = np.ones((c.num_layers, c.intermediate_size), np.float64)
            mask[l, f] = m
            from capjax.model import unembed
            from capjax.structured.mask import masked_hidden

            x = masked_hidden(model, params, tokens, am, channel_mask=mask.astype(np.float32))
            vals.append(_loss_from_logits(unembed(model, params, x), tokens, loss_mask))
        fd = (vals[1] - vals[0]) / (2 * eps)
        np.testing.assert_allclose(grad_scores[l, f], -fd, atol=2e-4, rtol=1e-2)
    np.testing.assert_allclose(
        answer_loss(model, params, tokens, loss_mask, am),
        _loss_from_logits(
            model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)), tokens, loss_mask
        ),
        rtol=1e-5,
    )


def _hf_layer_io(hf, tokens, am):
    """Per layer: (input hidden [B, T, E], output hidden, down_proj input [B, T, F]) from PyTorch hooks."""
    io = {}
    handles = []
    for l, layer in enumerate(hf.model.layers):

        def pre(mod, args, kwargs, l=l):
            io.setdefault(l, {})["x"] = (args[0] if args else kwargs["hidden_states"]).detach().numpy()

        def post(mod, args, kwargs, out, l=l):
            io[l]["y"] = (out[0] if isinstance(out, tuple) else out).detach().numpy()

        def down(mod, args, l=l):
            io.setdefault(l, {})["a"] = args[0].detach().numpy()

        handles += [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.register_forward_hook(post, with_kwargs=True),
            layer.mlp.down_proj.register_forward_pre_hook(down),
        ]
    try:
        with torch.no_grad():
            hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(am))
    finally:
        for h in handles:
            h.remove()
    return io


def test_activation_and_block_influence_match_pytorch(tiny):
    hf, model, params, tokens, loss_mask, am = tiny
    io = _hf_layer_io(hf, tokens, am)
    real = am.astype(bool)
    act = channel_activation_scores(model, params, tokens, am, batch_size=3)
    bi = layer_influence_scores(model, params, tokens, am, batch_size=3)
    for l in range(model.config.num_layers):
        np.testing.assert_allclose(act[l], np.abs(io[l]["a"][real]).mean(0), rtol=1e-4, atol=1e-6)
        x, y = io[l]["x"][real].astype(np.float64), io[l]["y"][real].astype(np.float64)
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        np.testing.assert_allclose(bi[l], (1 - cos).mean(), rtol=1e-4, atol=1e-6)


def test_block_ablation_equals_removing_the_layer(tiny):
    _, model, params, tokens, loss_mask, am = tiny
    c = model.config
    scores = layer_ablation_scores(model, params, tokens, loss_mask, am)
    intact = _loss_from_logits(
        model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)), tokens, loss_mask
    )
    for l in range(c.num_layers):
        plan = choose(c, target_shape(c, layers=1), layer_scores=-np.eye(c.num_layers)[l])  # drops layer l
        assert l not in plan.layers
        small, sp = shrink(model, params, plan)
        removed = _loss_from_logits(
            small.apply({"params": sp}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)), tokens, loss_mask
        )
        np.testing.assert_allclose(scores[l], removed - intact, atol=2e-5)


def test_registry_cap_structured_masks_equal_the_shrunken_model(tiny):
    """capjax.prune(..., "cap_structured") zeroes exactly what the plan removes: its logits are the
    shrunken model's (same scores: CAP deltas, channel gradients, block ablation)."""
    from capjax.structured.method import structured_plan

    _, model, params, tokens, loss_mask, am = tiny
    c = model.config
    delta = np.random.default_rng(5).normal(size=(c.num_layers, c.num_heads))
    calib = {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": am}
    pruned, masks = capjax.prune(
        model, params, "cap_structured", 0.5, head_scores=delta, calib=calib, heads=0.5, mlp=0.25, layers=1
    )
    plan = structured_plan(model, params, target_shape(c, heads=0.5, mlp=0.25, layers=1), delta, tokens, loss_mask, am)
    small, sp = shrink(model, params, plan)
    ref = np.asarray(small.apply({"params": sp}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)))
    got = np.asarray(model.apply({"params": pruned}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)))
    valid = am.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=2e-5)


def _hf_answer_loss(hf, tokens, am, loss_mask):
    """transformers' answer NLL per answer token (torch, differentiable)."""
    logits = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(am)).logits
    lp = torch.log_softmax(logits.double(), dim=-1)
    b, t = np.nonzero(loss_mask[:, 1:] > 0)
    return -lp[b, t, torch.as_tensor(tokens[b, t + 1])].mean()


def test_taylor_scores_and_plan_match_pytorch_attribution(tiny):
    """taylor = |sum over tokens of a * d loss / d a| at down_proj's input a (PyTorch autograd), and
    the taylor plan keeps each layer's channels of highest |.|."""
    from capjax.structured.method import structured_plan

    hf, model, params, tokens, loss_mask, am = tiny
    c = model.config
    acts = {}

    def keep(mod, args, l):
        args[0].retain_grad()
        acts[l] = args[0]

    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args, l=l: keep(mod, args, l))
        for l, layer in enumerate(hf.model.layers)
    ]
    try:
        _hf_answer_loss(hf, tokens, am, loss_mask).backward()
    finally:
        for h in handles:
            h.remove()
        hf.zero_grad()
    oracle = np.stack(
        [-(acts[l] * acts[l].grad).detach().double().sum(dim=(0, 1)).numpy() for l in range(c.num_layers)]
    )
    grad = channel_gradient_scores(model, params, tokens, loss_mask, am, batch_size=3)
    np.testing.assert_allclose(grad, oracle, rtol=1e-3, atol=1e-6)
    shape = target_shape(c, mlp=0.5)
    plan = structured_plan(
        model, params, shape, tokens=tokens, loss_mask=loss_mask, attention_mask=am, mlp_score="taylor", batch_size=3
    )
    for i, l in enumerate(plan.layers):
        want = np.sort(np.argsort(-np.abs(oracle[l]), kind="stable")[: shape.intermediate_size])
        np.testing.assert_array_equal(plan.channels[i], want)


def test_head_activation_matches_pytorch(tiny):
    from capjax.structured.scores import head_activation_scores

    hf, model, params, tokens, loss_mask, am = tiny
    c = model.config
    z = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, l=l: z.__setitem__(l, args[0].detach().numpy())
        )
        for l, layer in enumerate(hf.model.layers)
    ]
    try:
        with torch.no_grad():
            hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(am))
    finally:
        for h in handles:
            h.remove()
    got = head_activation_scores(model, params, tokens, am, batch_size=3)
    real = am.astype(bool)
    for l in range(c.num_layers):
        per_head = np.linalg.norm(z[l][real].reshape(-1, c.num_heads, c.head_dim).astype(np.float64), axis=-1)
        np.testing.assert_allclose(got[l], per_head.mean(0), rtol=1e-4, atol=1e-6)


def test_channel_group_ablation_equals_zeroing_the_rows_in_pytorch(tiny, capsys):
    """Exact group ablation (packed rows, prefix reuse, vmapped in steps) against
    a plain loop over transformers' model with the group's down_proj columns zeroed, its progress bar
    reaching every ablation; the 'ablation' plan keeps the groups of highest loss increase, then the
    highest activations."""
    from capjax.structured.method import structured_plan
    from capjax.structured.scores import channel_group_ablation_scores, rank_groups

    hf, model, params, tokens, loss_mask, am = tiny
    c = model.config
    act = channel_activation_scores(model, params, tokens, am, batch_size=3)
    size = c.intermediate_size // 4 + 1  # 4 groups, the last one smaller
    groups = rank_groups(act, size)
    M = groups.max() + 1
    got = channel_group_ablation_scores(
        model, params, tokens, loss_mask, groups, am, ablation_batch=5, progress=True
    )  # 12 ablations in steps of 4 (at most 5, one layer per step), each from its layer's intact input
    assert got.shape == (c.num_layers, M)
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "ablating channel groups: 100%" in bar and f"{c.num_layers * M}/{c.num_layers * M}" in bar, bar
    with torch.no_grad():
        intact = float(_hf_answer_loss(hf, tokens, am, loss_mask))
        want = np.zeros((c.num_layers, M))
        for l in range(c.num_layers):
            w = hf.model.layers[l].mlp.down_proj.weight  # [E, F]
            for m in range(M):
                saved = w.clone()
                w[:, torch.as_tensor(groups[l] == m)] = 0.0
                want[l, m] = float(_hf_answer_loss(hf, tokens, am, loss_mask)) - intact
                w.copy_(saved)
    np.testing.assert_allclose(got, want, atol=5e-5)
    assert np.abs(want).max() > 1e-3  # the groups matter: the comparison is not between zeros
    shape = target_shape(c, mlp=0.5)
    plan = structured_plan(
        model,
        params,
        shape,
        tokens=tokens,
        loss_mask=loss_mask,
        attention_mask=am,
        mlp_score="ablation",
        batch_size=3,
        mlp_group=size,
    )
    for i, l in enumerate(plan.layers):
        order = np.lexsort((-act[l], -want[l][groups[l]]))  # group delta first, then activation, descending
        np.testing.assert_array_equal(plan.channels[i], np.sort(order[: shape.intermediate_size]))
