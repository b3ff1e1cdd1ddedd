"""`capjax score` writes the same scores as the library call, with its settings."""

from __future__ import annotations

import json

import numpy as np

import capjax
from capjax.cli import main
from capjax.data import build_calibration
from capjax.provenance import code_version
from conftest import needs_smollm2


@needs_smollm2
def test_score_cli_matches_library(tmp_path, tiny_with_tokenizer, capsys):
    out = tmp_path / "scores.npz"
    argv = [
        "score",
        "--model",
        str(tiny_with_tokenizer),
        "--calib",
        "synthetic",
        "--n",
        "6",
        "--seq-len",
        "128",
        "--subsets",
        "3",
        "--aggregate",
        "paired",
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "heat.png"),
    ]
    assert main(argv) == 0
    assert "scored 8 heads" in capsys.readouterr().out
    saved = np.load(out)
    settings = json.loads(str(saved["settings"]))
    assert settings["aggregate"] == "paired" and settings["n"] == 6 and settings["calib"] == "synthetic"
    assert settings["code"] == code_version() and (settings["kind"], settings["metric"]) == ("zero", "ce")
    model, params = capjax.load_pretrained(tiny_with_tokenizer)
    calib = build_calibration("synthetic", capjax.load_tokenizer(tiny_with_tokenizer), n=6, seq_len=128, seed=0)
    ref = capjax.score_heads(
        model, params, calib.tokens, calib.loss_mask, 3, "paired", attention_mask=calib.attention_mask, progress=False
    )
    np.testing.assert_allclose(saved["delta"], ref.delta, atol=1e-6)
    np.testing.assert_allclose(saved["masked"], ref.masked, atol=1e-6)
    assert (tmp_path / "heat.png").stat().st_size > 1000


def test_score_cli_bad_model_path(tmp_path, capsys):
    assert main(["score", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "s.npz")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_score_cli_too_little_memory(tmp_path, capsys, monkeypatch, tiny_with_tokenizer):
    from capjax import memory

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1000)
    assert main(["score", "--model", str(tiny_with_tokenizer), "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert "capjax score: error: not enough memory to load this model" in err and "host RAM has 0.00 GiB" in err
    assert not (tmp_path / "s.npz").exists()


@needs_smollm2
def test_score_cli_kind_and_metric(tmp_path, tiny_with_tokenizer):
    """--kind / --metric reach score_heads and are recorded in the file (HeadScores.load reads them)."""
    out = tmp_path / "scores.npz"
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
                "resample",
                "--metric",
                "kl",
                "--bootstrap",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = capjax.HeadScores.load(out)
    assert (saved.kind, saved.metric, saved.aggregate) == ("resample", "kl", "median")
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
        kind="resample",
        metric="kl",
    )
    np.testing.assert_allclose(saved.delta, ref.delta, atol=1e-6)
    np.testing.assert_allclose(saved.example_masked, ref.example_masked, atol=1e-6)
