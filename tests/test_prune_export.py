"""Pruned checkpoints round-trip through transformers, and the `capjax prune` CLI."""

from __future__ import annotations

import hashlib
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import capjax  # noqa: E402
from capjax import cli  # noqa: E402
from capjax.provenance import code_version  # noqa: E402
from capjax.pruning import PRUNABLE, prune, sparsity_report  # noqa: E402
from capjax.pruning.importance import rows_view  # noqa: E402
from conftest import char_tokenizer  # noqa: E402

L, E, F, H, K, D, V = 2, 32, 48, 4, 2, 8, 101


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=K,
        max_position_embeddings=512,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    model, params = capjax.load_pretrained(folder)
    delta = np.random.default_rng(0).normal(size=(L, H))
    return types.SimpleNamespace(folder=folder, model=model, params=params, delta=delta)


def get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def hf_weight_name(path, layer):
    _, group, name, _ = path.split("/")
    return f"model.layers.{layer}.{group}.{name}.weight"


def reload_and_compare(tiny, pruned, out):
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, V, (2, 12))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(tiny.model.apply({"params": pruned}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    sd = hf.state_dict()
    rep = sparsity_report(pruned)
    for p in PRUNABLE:
        for l in range(L):
            w = sd[hf_weight_name(p, l)].numpy()
            assert int((w == 0).sum()) == rep.matrices[(l, ".".join(p.split("/")[1:3]))][0]
            want = np.asarray(rows_view(get(pruned, p)[l], p, stacked=False)).T
            np.testing.assert_array_equal(w, want)
    np.testing.assert_array_equal(
        sd["model.embed_tokens.weight"].numpy(), np.asarray(tiny.params["embed_tokens"]["embedding"])
    )
    return rep


@pytest.mark.parametrize("method", ["cap", "sparsegpt"])
def test_export_roundtrip(tiny, tmp_path, method):
    calib = {
        "tokens": np.random.default_rng(2).integers(0, V, (4, 16)).astype(np.int32),
        "attention_mask": np.ones((4, 16), np.int32),
    }
    pruned, _ = prune(tiny.model, tiny.params, method, 0.4, head_scores=tiny.delta, calib=calib)
    capjax.save_pretrained(tiny.model, pruned, tmp_path / "out")
    rep = reload_and_compare(tiny, pruned, tmp_path / "out")
    assert rep.total == pytest.approx(0.4, abs=0.01)


def test_cli_cap_with_scores(tiny, tmp_path, capsys):
    np.savez(tmp_path / "scores.npz", delta=tiny.delta)
    out = tmp_path / "pruned"
    rc = cli.main(
        [
            "prune",
            "--model",
            str(tiny.folder),
            "--method",
            "cap",
            "--sparsity",
            "0.3",
            "--scores",
            str(tmp_path / "scores.npz"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "total sparsity 30.0000%" in printed
    pruned, masks = prune(tiny.model, tiny.params, "cap", 0.3, head_scores=tiny.delta)
    with np.load(out / "masks.npz") as z:
        assert sorted(z.files) == sorted(PRUNABLE)
        for p in PRUNABLE:
            np.testing.assert_array_equal(z[p], np.asarray(get(masks, p)))
    reload_and_compare(tiny, pruned, out)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    made = json.loads((out / "capjax_prune.json").read_text())
    assert (made["method"], made["sparsity"], made["calibration"]) == ("cap", 0.3, None)
    assert made["achieved_sparsity"] == pytest.approx(0.3, abs=1e-4) and made["code"] == code_version()
    assert made["scores"]["digest"] == hashlib.sha256((tmp_path / "scores.npz").read_bytes()).hexdigest()[:20]


def test_cli_wanda_synthetic_nm(tiny, tmp_path):
    out = tmp_path / "pruned"
    rc = cli.main(
        [
            "prune",
            "--model",
            str(tiny.folder),
            "--method",
            "wanda",
            "--nm",
            "2:4",
            "--calib",
            "synthetic",
            "--n",
            "4",
            "--seq-len",
            "320",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    from capjax.data import build_calibration

    calib = build_calibration("synthetic", capjax.load_tokenizer(tiny.folder), n=4, seq_len=320, seed=0)
    _, masks = prune(tiny.model, tiny.params, "wanda", 0.5, calib=calib, nm=(2, 4))
    _, reloaded = capjax.load_pretrained(out)
    made = json.loads((out / "capjax_prune.json").read_text())
    assert made["nm"] == "2:4" and made["scores"] is None
    assert made["calibration"] == {"task": "synthetic", "n": 4, "seq_len": 320, "seed": 0}
    with np.load(out / "masks.npz") as z:
        for p in PRUNABLE:
            np.testing.assert_array_equal(z[p], np.asarray(get(masks, p)))
            rows = np.asarray(rows_view(get(reloaded, p), p))
            nonzero = (rows.reshape(L, rows.shape[1] // 4, 4, rows.shape[2]) != 0).sum(axis=2)
            assert nonzero.max() <= 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "cap"], "needs --scores"),
        (["--method", "wanda"], "needs --calib"),
        (["--method", "magnitude", "--nm", "4:4"], "N < M"),
        (["--method", "magnitude", "--sparsity", "1.5"], "sparsity must be in"),
        (["--method", "cap", "--scores", "BAD"], "delta"),
    ],
)
def test_cli_errors(tiny, tmp_path, capsys, argv, message):
    np.savez(tmp_path / "bad.npz", other=np.zeros(3))
    argv = [a.replace("BAD", str(tmp_path / "bad.npz")) for a in argv]
    rc = cli.main(["prune", "--model", str(tiny.folder), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
