"""Ablation kinds are a registry: a user's kind works through ablate, score_heads, `capjax score --kind`
and a config's calibration.kind, and equals PyTorch forward hooks replacing each head by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import capjax
from capjax.ablation import ablate, prepare_batch, register_kind, single_spec, unregister_kind
from conftest import make_hf_model, needs_smollm2
from test_ablation import D, H, L, make_batch

PLUGIN = '''
import jax.numpy as jnp
import numpy as np
from capjax.ablation import register_kind


def constant(model, params, batch, seed):
    """Every head's output replaced by a fixed random vector per head (seeded)."""
    c = model.config
    rng = np.random.default_rng(seed)
    rep = lambda *s: jnp.asarray(rng.normal(size=s), model.dtype)
    return {"heads": rep(c.num_layers, c.num_heads, c.head_dim), "attn": rep(c.num_layers, c.hidden_size),
            "mlp": rep(c.num_layers, c.hidden_size)}


register_kind("constant", constant)
'''


def _constant():
    namespace = {}
    exec(PLUGIN.replace('register_kind("constant", constant)', ""), namespace)
    return namespace["constant"]


def torch_head_values(hf, tokens, am, loss, heads_rep):
    """[L * H, B]: answer NLL summed per example with head h of layer l replaced by heads_rep[l, h]."""
    sel = (loss[:, 1:] > 0) & (am[:, 1:] > 0) & (am[:, :-1] > 0)
    out = []
    for l, h in np.ndindex(L, H):

        def pre(m, a, l=l, h=h):
            x = a[0].reshape(*a[0].shape[:2], H, D).clone()
            x[:, :, h] = torch.tensor(heads_rep[l, h], dtype=x.dtype)
            return (x.reshape(a[0].shape),) + tuple(a[1:])

        handle = hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits.double()
        finally:
            handle.remove()
        logp = torch.log_softmax(logits[:, :-1], -1)
        nll = -logp.gather(-1, torch.tensor(tokens[:, 1:])[..., None])[..., 0].numpy()
        out.append((nll * sel).sum(1))
    return np.stack(out)


def test_registered_kind_through_ablate_and_score_heads_equals_torch(tmp_path):
    hf = make_hf_model(tmp_path, "llama", initializer_range=0.2)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, loss, am = make_batch("padded")
    fn = _constant()
    register_kind("constant", fn)
    try:
        with pytest.raises(ValueError, match="ablation kind 'constant' is already registered"):
            register_kind("constant", fn)
        batch = prepare_batch(model, tokens, loss, am)
        res = ablate(model, params, batch, single_spec(model.config, "heads"), kind="constant", seed=3)
        scores = capjax.score_heads(
            model, params, tokens, loss, subsets=1, aggregate="mean", attention_mask=am, progress=False, kind="constant"
        )
    finally:
        unregister_kind("constant")
    reps = fn(model, params, batch, 3)
    want = torch_head_values(hf, tokens, am, loss, np.asarray(reps["heads"]))
    np.testing.assert_allclose(res.values, want, atol=2e-4, rtol=1e-5)
    want0 = torch_head_values(hf, tokens, am, loss, np.asarray(fn(model, params, batch, 0)["heads"]))  # seed 0
    np.testing.assert_allclose(scores.example_masked.reshape(L * H, -1), want0, atol=2e-4, rtol=1e-5)
    assert scores.kind == "constant"
    with pytest.raises(ValueError, match=r"^unknown ablation kind 'constant': use one of zero, mean, resample, or"):
        capjax.score_heads(model, params, tokens, loss, attention_mask=am, progress=False, kind="constant")


@needs_smollm2
def test_plugin_kind_reaches_score_cli_and_configs(tmp_path, monkeypatch, tiny_with_tokenizer):
    from capjax.cli import main
    from capjax.data import build_calibration
    from capjax.experiment.config import load_run_config

    plugin = tmp_path / "my_kind.py"
    plugin.write_text(PLUGIN)
    monkeypatch.setenv("CAPJAX_PLUGINS", str(plugin))
    out = tmp_path / "scores.npz"
    try:
        assert (
            main(
                [
                    "score",
                    "--model",
                    str(tiny_with_tokenizer),
                    "--calib",
                    "synthetic",
                    "--n",
                    "4",
                    "--seq-len",
                    "128",
                    "--subsets",
                    "2",
                    "--kind",
                    "constant",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        saved = capjax.HeadScores.load(out)
        model, params = capjax.load_pretrained(tiny_with_tokenizer)
        calib = build_calibration("synthetic", capjax.load_tokenizer(tiny_with_tokenizer), n=4, seq_len=128, seed=0)
        ref = capjax.score_heads(
            model,
            params,
            calib.tokens,
            calib.loss_mask,
            2,
            attention_mask=calib.attention_mask,
            progress=False,
            kind="constant",
        )
        cfg = tmp_path / "run.yaml"
        cfg.write_text(
            f"model: {tiny_with_tokenizer}\ncalibration: {{kind: constant, tasks: [synthetic]}}\n"
            "evaluation: {tasks: [synthetic]}\n"
        )
        assert load_run_config(cfg).calibration.kind == "constant"
    finally:
        unregister_kind("constant")
    assert saved.kind == "constant"
    np.testing.assert_allclose(saved.delta, ref.delta, atol=1e-6)
    zero = capjax.score_heads(
        model, params, calib.tokens, calib.loss_mask, 2, attention_mask=calib.attention_mask, progress=False
    )
    assert np.abs(zero.delta - ref.delta).max() > 1e-3  # the kind was really used


CORRUPTED_PLUGIN = '''
from capjax.ablation import component_outputs, register_kind


def corrupted(model, params, batch, seed):
    """Each component's output on a corrupted copy of the calibration batch: every token id + 1
    (mod V), same packed layout, so position p is replaced by the corrupted run's position p."""
    tokens, segment_ids, positions, prefix = batch.rows
    return component_outputs(model, params, ((tokens + 1) % model.config.vocab_size, segment_ids, positions, prefix))


register_kind("corrupted", corrupted)
'''


def torch_patched_head_values(hf, tokens, am, loss):
    """[L, H, B] oracle of the "corrupted" kind with transformers forward hooks: the clean batch with
    head h of layer l's output (o_proj's input) at every position taken from the run on tokens + 1."""
    cfg = hf.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    D = cfg.hidden_size // H
    seen = {}
    hooks = [
        hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: seen.__setitem__(l, a[0].detach().clone())
        )
        for l in range(L)
    ]
    try:
        with torch.no_grad():
            hf(torch.tensor((tokens + 1) % cfg.vocab_size), attention_mask=torch.tensor(am))
    finally:
        for h in hooks:
            h.remove()
    sel = (loss[:, 1:] > 0) & (am[:, 1:] > 0) & (am[:, :-1] > 0)
    out = np.zeros((L, H, tokens.shape[0]))
    for l, h in np.ndindex(L, H):

        def pre(m, a, l=l, h=h):
            x = a[0].reshape(*a[0].shape[:2], H, D).clone()
            x[:, :, h] = seen[l].reshape(*a[0].shape[:2], H, D)[:, :, h]
            return (x.reshape(a[0].shape),) + tuple(a[1:])

        handle = hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits.double()
        finally:
            handle.remove()
        logp = torch.log_softmax(logits[:, :-1], -1)
        nll = -logp.gather(-1, torch.tensor(tokens[:, 1:])[..., None])[..., 0].numpy()
        out[l, h] = (nll * sel).sum(1)
    return out


@needs_smollm2
def test_user_corrupted_kind_from_a_plugin_file_through_ablate_score_and_run(
    tmp_path, monkeypatch, tiny_with_tokenizer
):
    """A user's kind ("replace by the output on a corrupted batch") in their own file, loaded through
    CAPJAX_PLUGINS, works in `ablate`, `score_heads`, `capjax score --kind` and `capjax run`
    (calibration.kind), each equal to a transformers forward-hook loop."""
    import json

    import transformers
    import yaml

    from capjax.ablation.kinds import names
    from capjax.cli import main
    from capjax.data import build_calibration

    plugin = tmp_path / "corrupt_kind.py"
    plugin.write_text(CORRUPTED_PLUGIN)
    monkeypatch.setenv("CAPJAX_PLUGINS", str(plugin))
    n, T, U = 4, 128, 2
    model, params = capjax.load_pretrained(tiny_with_tokenizer)
    calib = build_calibration("synthetic", capjax.load_tokenizer(tiny_with_tokenizer), n=n, seq_len=T, seed=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()
    want = torch_patched_head_values(hf, calib.tokens, calib.attention_mask, calib.loss_mask)  # [L, H, B]
    c = model.config
    out = tmp_path / "out"
    try:
        assert "corrupted" in names()  # registered by the plugin file alone
        batch = prepare_batch(model, calib.tokens, calib.loss_mask, calib.attention_mask)
        res = ablate(model, params, batch, single_spec(c, "heads"), kind="corrupted")
        scores = capjax.score_heads(
            model,
            params,
            calib.tokens,
            calib.loss_mask,
            U,
            attention_mask=calib.attention_mask,
            progress=False,
            kind="corrupted",
        )
        assert (
            main(
                [
                    "score",
                    "--model",
                    str(tiny_with_tokenizer),
                    "--calib",
                    "synthetic",
                    "--n",
                    str(n),
                    "--seq-len",
                    str(T),
                    "--subsets",
                    str(U),
                    "--kind",
                    "corrupted",
                    "--out",
                    str(tmp_path / "scores.npz"),
                ]
            )
            == 0
        )
        cfg = {
            "model": str(tiny_with_tokenizer),
            "out": str(out),
            "seed": 0,
            "calibration": {
                "tasks": ["synthetic"],
                "n": n,
                "seq_len": T,
                "subsets": U,
                "kind": "corrupted",
                "bootstrap": 0,
            },
            "pruning": {"methods": ["cap"], "sparsities": [0.5]},
            "evaluation": {"tasks": ["synthetic"], "limit": 2, "max_new_tokens": 4, "bootstrap": 0},
        }
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["run", str(tmp_path / "run.yaml")]) == 0
    finally:
        unregister_kind("corrupted")
    np.testing.assert_allclose(res.values.reshape(c.num_layers, c.num_heads, n), want, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(scores.example_masked, want, atol=2e-4, rtol=1e-5)
    cli = capjax.HeadScores.load(tmp_path / "scores.npz")
    assert cli.kind == "corrupted"
    np.testing.assert_allclose(cli.example_masked, want, atol=2e-4, rtol=1e-5)
    results = json.loads((out / "results.json").read_text())
    ran = capjax.HeadScores.load(out / "artifacts" / "scores" / f"{results['scores']['synthetic']['fingerprint']}.npz")
    assert ran.kind == "corrupted"
    np.testing.assert_allclose(ran.example_masked, want, atol=2e-4, rtol=1e-5)
    zero = capjax.score_heads(
        model, params, calib.tokens, calib.loss_mask, U, attention_mask=calib.attention_mask, progress=False
    )
    assert np.abs(zero.example_masked - want).max() > 1e-2  # the corrupted outputs were really used
