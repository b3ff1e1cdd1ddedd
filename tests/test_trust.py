"""Results you can trust: `capjax run` reuses an artifact only when everything that produced it is
unchanged, recomputes what changed, detects damaged artifacts, and a rerun with new settings
reports exactly what a fresh run into an empty folder reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from capjax.attribution import aggregate_scores
from capjax.cli import main
from conftest import make_hf_model, needs_smollm2

pytestmark = needs_smollm2

BASE = {
    "seed": 0,
    "calibration": {"tasks": ["synthetic"], "n": 3, "seq_len": 96, "subsets": 3, "chat": False, "bootstrap": 100},
    "pruning": {"methods": ["cap", "random"], "sparsities": [0.3]},
    "evaluation": {"tasks": ["synthetic"], "limit": 2, "max_new_tokens": 4, "batch_size": 2, "bootstrap": 100},
}


def _run(model: Path, out: Path, *overrides: str) -> dict:
    cfg = {"model": str(model), "out": str(out), **BASE}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), *overrides]) == 0
    return json.loads((out / "results.json").read_text())


def _computed(results: dict) -> set[str]:
    return {e.split(" ", 1)[1] for e in results["events"] if e.startswith("computed")}


def _numbers(results: dict) -> list:
    return [(r["name"], r["achieved_sparsity"], r["metrics"], r["intervals"], r["vs_dense"]) for r in results["runs"]]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_with_tokenizer):
    root = tmp_path_factory.mktemp("trust")
    results = _run(tiny_with_tokenizer, root / "base")
    assert _computed(results) == {
        "scores/synthetic",
        "masks/cap_synthetic_s0.30",
        "masks/random_s0.30",
        "evals/dense/synthetic",
        "evals/cap_synthetic_s0.30/synthetic",
        "evals/random_s0.30/synthetic",
    }
    return root / "base", results


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def test_rerun_with_new_settings_equals_a_fresh_run(tmp_path, base_run, tiny_with_tokenizer, capsys):
    """The issue's sequence: n=3/median/limit 2, then n=6/paired/limit 4 into the same folder."""
    base, first = base_run
    out = _copy(base, tmp_path / "same")
    new = ["calibration.n=6", "calibration.aggregate=paired", "evaluation.limit=4"]
    again = _run(tiny_with_tokenizer, out, *new)
    assert "scores/synthetic" in _computed(again)  # new calibration: rescored, not reused
    fresh = _run(tiny_with_tokenizer, tmp_path / "fresh", *new)
    assert _numbers(again) == _numbers(fresh)
    assert again["scores"] == fresh["scores"]
    assert again["config"]["calibration"]["n"] == 6 and again["runs"][0]["eval"]["synthetic"]["metrics"]["n"] == 4
    # switching back costs nothing: every artifact of the first settings is still there, by fingerprint
    back = _run(tiny_with_tokenizer, out)
    assert _computed(back) == set()
    assert _numbers(back) == _numbers(first)
    report = (out / "report.md").read_text()
    assert "Reused from earlier runs (same fingerprints): dense (reused)" in report
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("name,method,calib,target_sparsity,achieved_sparsity,metric,value,stderr,ci_low")
    assert len(rows) == 1 + 3 * 2 and all(r.endswith(",reused") for r in rows[1:])


@pytest.mark.parametrize(
    "family,overrides,recomputed",
    [
        (
            "calibration",
            ["calibration.n=4"],
            {"scores/synthetic", "masks/cap_synthetic_s0.30", "evals/cap_synthetic_s0.30/synthetic"},
        ),
        (
            "scoring",
            ["calibration.subsets=1"],
            {"scores/synthetic", "masks/cap_synthetic_s0.30", "evals/cap_synthetic_s0.30/synthetic"},
        ),
        (
            "aggregate",
            ["calibration.aggregate=paired"],
            {"masks/cap_synthetic_s0.30", "evals/cap_synthetic_s0.30/synthetic"},
        ),
        ("pruning", ["pruning.options.random.seed=99"], {"masks/random_s0.30", "evals/random_s0.30/synthetic"}),
        (
            "evaluation",
            ["evaluation.max_new_tokens=5"],
            {"evals/dense/synthetic", "evals/cap_synthetic_s0.30/synthetic", "evals/random_s0.30/synthetic"},
        ),
        ("chunking", ["calibration.chunk_size=1"], set()),  # chunking does not change scores
    ],
)
def test_each_setting_family_recomputes_only_what_it_determines(
    tmp_path, base_run, tiny_with_tokenizer, family, overrides, recomputed
):
    base, first = base_run
    out = _copy(base, tmp_path / "out")
    results = _run(tiny_with_tokenizer, out, *overrides)
    assert _computed(results) == recomputed
    if family == "aggregate":  # re-aggregated from the saved per-subset losses, no forward pass
        saved = np.load(out / "artifacts" / "scores" / f"{results['scores']['synthetic']['fingerprint']}.npz")
        np.testing.assert_allclose(
            results["scores"]["synthetic"]["delta"], aggregate_scores(saved["masked"], saved["baseline"], "paired")
        )
        assert results["scores"]["synthetic"]["fingerprint"] == first["scores"]["synthetic"]["fingerprint"]
    fresh = _run(tiny_with_tokenizer, tmp_path / "fresh", *overrides)
    assert _numbers(results) == _numbers(fresh)


def test_another_model_into_the_same_folder_recomputes_everything(tmp_path, base_run, tiny_with_tokenizer):
    """Same config, same folder layout, other weights: nothing of the first model is reused."""
    from safetensors.numpy import load_file, save_file

    base, first = base_run
    other = tmp_path / "other"
    shutil.copytree(tiny_with_tokenizer, other)
    weights = load_file(other / "model.safetensors")
    weights = {k: (v * 1.5 if k.endswith("mlp.up_proj.weight") else v) for k, v in weights.items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    out = _copy(base, tmp_path / "out")
    results = _run(other, out)
    assert _computed(results) == _computed(first)
    assert results["runs"][0]["fingerprint"] != first["runs"][0]["fingerprint"]
    assert results["runs"][0]["metrics"] != first["runs"][0]["metrics"]
    assert _numbers(results) == _numbers(_run(other, tmp_path / "fresh"))


@pytest.mark.parametrize(
    "kind,damage", [("scores", "truncate"), ("masks", "garbage"), ("evals", "truncate"), ("evals", "empty")]
)
def test_damaged_artifacts_are_reported_and_recomputed(tmp_path, base_run, tiny_with_tokenizer, capsys, kind, damage):
    base, first = base_run
    out = _copy(base, tmp_path / "out")
    files = sorted((out / "artifacts" / kind).iterdir())
    victim = files[0]
    data = victim.read_bytes()
    victim.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 50, "empty": b"{}"}[damage])
    capsys.readouterr()
    results = _run(tiny_with_tokenizer, out)
    err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if "is unreadable" in l]
    assert len(warnings) == 1 and str(victim) in warnings[0] and "recomputing" in warnings[0]
    assert len(_computed(results)) >= 1 and all(c.startswith(kind) for c in _computed(results))
    assert _numbers(results) == _numbers(first)
    assert victim.read_bytes() != {"truncate": data[: len(data) // 2]}.get(damage)


def test_damaged_scoring_checkpoint_is_recomputed(tmp_path, capsys):
    """An in-progress orbax checkpoint of a layer group that cannot be read is redone, not used."""
    import capjax

    make_hf_model(tmp_path / "m", "llama")
    model, params = capjax.load_pretrained(tmp_path / "m")
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 101, (3, 8))
    loss_mask = np.zeros((3, 8), np.float32)
    loss_mask[:, 4:] = 1
    ckpt = tmp_path / "ckpt"
    ref = capjax.score_heads(
        model, params, tokens, loss_mask, subsets=3, checkpoint_dir=ckpt, layers_per_call=1, progress=False
    )
    groups = sorted(g for g in ckpt.glob("*/layers_*") if g.is_dir())  # not the code stamps beside them
    assert len(groups) == 2
    for f in groups[1].rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    again = capjax.score_heads(
        model, params, tokens, loss_mask, subsets=3, checkpoint_dir=ckpt, layers_per_call=1, progress=False
    )
    assert "is unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(again.masked, ref.masked)


def test_recovery_rows_in_the_report_and_reused_on_rerun(tmp_path, base_run, tiny_with_tokenizer):
    """`recovery:` adds a "+recovery" row after each pruned model, exactly as sparse as it; a rerun
    reuses the recovery and its evaluations (keyed by the pruned model and the settings)."""
    base, first = base_run
    out = _copy(base, tmp_path / "out")
    rec = [
        "recovery.steps=2",
        "recovery.batch_size=2",
        "recovery.n=4",
        "recovery.seq_len=160",
        "recovery.data=synthetic",
        "recovery.mode=full",
        "recovery.warmup_steps=0",
    ]
    results = _run(tiny_with_tokenizer, out, *rec)
    names = [r["name"] for r in results["runs"]]
    assert names == [
        "dense",
        "cap_synthetic_s0.30",
        "cap_synthetic_s0.30+recovery",
        "random_s0.30",
        "random_s0.30+recovery",
    ]
    assert _computed(results) == {
        "recovery/cap_synthetic_s0.30+recovery",
        "recovery/random_s0.30+recovery",
        "evals/cap_synthetic_s0.30+recovery/synthetic",
        "evals/random_s0.30+recovery/synthetic",
    }
    by = {r["name"]: r for r in results["runs"]}
    for name in ("cap_synthetic_s0.30", "random_s0.30"):
        assert by[name + "+recovery"]["achieved_sparsity"] == pytest.approx(by[name]["achieved_sparsity"], abs=1e-12)
        assert by[name + "+recovery"]["metrics"] != by[name]["metrics"]
    assert (out / "figures" / "recovery_loss.png").exists()
    assert "| cap+recovery | synthetic |" in (out / "report.md").read_text()
    again = _run(tiny_with_tokenizer, out, *rec)
    assert _computed(again) == set() and _numbers(again) == _numbers(results)
