"""`capjax prune --method cap_structured` and cap_structured in `capjax run`: shapes printed before
anything is written, a smaller standard folder that transformers loads with capjax's logits, and
one-line refusals before compute."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml

import capjax
from capjax.cli import main
from capjax.structured import Plan, shrink


def test_prune_cap_structured_writes_a_smaller_model(tmp_path, tiny_with_tokenizer, capsys):
    config = capjax.load_config(tiny_with_tokenizer)
    delta = np.random.default_rng(0).normal(size=(config.num_layers, config.num_heads))
    np.savez(tmp_path / "scores.npz", delta=delta)
    out = tmp_path / "out"
    argv = [
        "prune",
        "--model",
        str(tiny_with_tokenizer),
        "--method",
        "cap_structured",
        "--heads",
        "0.5",
        "--mlp",
        "0.25",
        "--layers",
        "1",
        "--scores",
        str(tmp_path / "scores.npz"),
        "--calib",
        "synthetic",
        "--n",
        "4",
        "--seq-len",
        "128",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.index("cap_structured: layers 2 -> 1, heads 4 -> 2 (kv 2 -> 2") < printed.index("wrote")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (hf.config.num_hidden_layers, hf.config.num_attention_heads, hf.config.intermediate_size) == (1, 2, 36)
    model, params = capjax.load_pretrained(tiny_with_tokenizer)
    plan = Plan.from_json((out / "structured_plan.json").read_text())
    np.testing.assert_array_equal(plan.heads[0] // 2, [0, 1])  # one head per kv group, the higher delta
    layer = plan.layers[0]
    for k in range(2):
        assert plan.heads[0, k] == 2 * k + int(np.argmax(delta[layer, 2 * k : 2 * k + 2]))
    small, small_params = shrink(model, params, plan)
    _, loaded = capjax.load_pretrained(out)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(small_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = np.random.default_rng(1).integers(0, 1000, (2, 9))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(small.apply({"params": small_params}, jnp.asarray(tokens))), ref, atol=1e-4)
    assert json.loads((out / "capjax_prune.json").read_text())["parameters"]["structured"] == small.config.num_params()


@pytest.mark.slow
def test_prune_cap_structured_with_exact_channel_group_ablation(tmp_path, tiny_with_tokenizer, capsys):
    """`--mlp-score ablation --mlp-group 16`: each layer keeps the channel groups whose zeroing (in
    transformers' model, a plain loop) raises the calibration answer loss most, then the highest
    activations; the folder records the group size."""
    from capjax.structured.scores import channel_activation_scores, rank_groups

    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_with_tokenizer), "--method", "cap_structured", "--mlp", "0.5"]
    argv += ["--mlp-score", "ablation", "--mlp-group", "16", "--calib", "synthetic", "--n", "3", "--seq-len", "128"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "MLP 48 -> 24" in capsys.readouterr().out
    plan = Plan.from_json((out / "structured_plan.json").read_text())
    assert json.loads((out / "capjax_prune.json").read_text())["mlp_group"] == 16

    model, params = capjax.load_pretrained(tiny_with_tokenizer)
    cal = capjax.build_calibration("synthetic", capjax.load_tokenizer(tiny_with_tokenizer), n=3, seq_len=128, seed=0)
    tokens, am, loss_mask = cal.tokens, cal.attention_mask, cal.loss_mask
    act = channel_activation_scores(model, params, tokens, am)  # [L, F]
    groups = rank_groups(act, 16)  # [L, F]: 3 groups per layer
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()

    def answer_loss():
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(am)).logits.double(), -1)
        b, t = np.nonzero(loss_mask[:, 1:] > 0)
        return float(-lp[b, t, torch.as_tensor(tokens[b, t + 1])].mean())

    intact = answer_loss()
    for i, l in enumerate(plan.layers):
        w = hf.model.layers[l].mlp.down_proj.weight  # [E, F]
        delta = np.zeros(3)
        for m in range(3):
            saved = w.detach().clone()
            with torch.no_grad():
                w[:, torch.as_tensor(groups[l] == m)] = 0.0
            delta[m] = answer_loss() - intact
            with torch.no_grad():
                w.copy_(saved)
        assert len(set(np.round(delta, 6))) == 3  # distinct group scores: the order below is decided by them
        order = np.lexsort((-act[l], -delta[groups[l]]))  # group loss increase first, then activation
        np.testing.assert_array_equal(plan.channels[i], np.sort(order[:24]))


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--mlp", "0.5", "--mlp-score", "ablation", "--mlp-group", "49", "--calib", "synthetic"],
            "--mlp-group 49:",
        ),
        (["--heads", "0.9"], "heads=0.9 leaves a layer with no heads"),
        (["--layers", "2"], "layers=2 removes all 2 layers"),
        (["--heads", "0.5"], "removing heads needs --scores"),
        (["--mlp", "0.5"], "removing MLP channels or layers needs --calib"),
    ],
)
def test_prune_cap_structured_refuses_before_compute(
    tmp_path, tiny_with_tokenizer, capsys, monkeypatch, flags, message
):
    def no_load(*a, **k):
        raise AssertionError("loaded the weights before refusing")

    monkeypatch.setattr(capjax, "load_pretrained", no_load)
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_with_tokenizer),
            "--method",
            "cap_structured",
            *flags,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written: the export is only swapped in at the end


def test_capjax_run_with_cap_structured(tmp_path, tiny_with_tokenizer):
    """A config's pruning section runs cap_structured (a parameter budget with one layer removed); its
    masked model equals the shrunken one, so the row's metrics are the smaller model's."""
    cfg = {
        "model": str(tiny_with_tokenizer),
        "out": str(tmp_path / "run"),
        "seed": 0,
        "calibration": {"tasks": ["synthetic"], "n": 4, "seq_len": 128, "subsets": 2},
        "pruning": {
            "methods": ["cap_structured"],
            "sparsities": [0.3],
            "options": {"cap_structured": {"layers": 1, "mlp_score": "activation"}},
        },
        "evaluation": {"tasks": ["synthetic"], "limit": 2, "max_new_tokens": 4, "batch_size": 2},
        "recovery": {
            "steps": 2,
            "warmup_steps": 0,
            "data": "synthetic",
            "n": 4,
            "seq_len": 128,
            "batch_size": 2,
            "mode": "full",
            "distil": True,
            "distil_temperature": 2.0,
        },
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "exp.yaml")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    row = next(r for r in results["runs"] if r["method"] == "cap_structured")
    # one of the two layers removed whole: at least half the prunable weights are zero
    assert row["achieved_sparsity"] >= 0.5
    names = [r["name"] for r in results["runs"]]
    assert names == [
        "dense",
        "cap_structured_synthetic_s0.30",
        "cap_structured_synthetic_s0.30+recovery",
        "cap_structured_synthetic_s0.30+distil",
    ]
    ce, distil = results["runs"][2], results["runs"][3]
    assert ce["fingerprint"] != distil["fingerprint"] and distil["achieved_sparsity"] >= 0.5  # masks kept
    assert "+distil" in (tmp_path / "run" / "report.md").read_text()
