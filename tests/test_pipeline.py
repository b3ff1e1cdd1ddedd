"""`capjax run` end to end on a tiny random model, and config validation before any compute."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from capjax.cli import main
from capjax.experiment import ConfigError, load_config
from conftest import HAS_DATA, DATA_DIR, make_hf_model, needs_smollm2


def _config(tmp_path, model, **over):
    cfg = {
        "model": str(model), "out": str(tmp_path / "out"), "seed": 0,
        "calibration": {"tasks": ["synthetic"], "n": 6, "seq_len": 128, "subsets": 3},
        "pruning": {"methods": ["cap", "wanda", "magnitude"], "sparsities": [0.2, 0.5]},
        "evaluation": {"tasks": ["synthetic", "wikitext2"], "limit": 3, "max_new_tokens": 6, "batch_size": 4,
                       "ppl_seq_len": 64, "skip_missing_data": True},
        "data_dir": str(DATA_DIR) if HAS_DATA else None,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and k in cfg else v
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@needs_smollm2
def test_run_end_to_end_and_rerun_reuses(tmp_path, tiny_with_tokenizer, capsys):
    path = _config(tmp_path, tiny_with_tokenizer)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert f"report: {out}/report.md" in printed
    for f in ["results.json", "report.md", "scores/synthetic.npz", "figures/head_scores_synthetic.png",
              "figures/metrics_vs_sparsity.png", "figures/layer_sparsity_s0.20.png", "figures/layer_sparsity_s0.50.png",
              "evals/dense/synthetic.json", "masks/cap_synthetic_s0.50", "masks/magnitude_s0.20"]:
        assert (out / f).exists(), f
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == ["dense", "cap_synthetic_s0.20", "cap_synthetic_s0.50", "wanda_synthetic_s0.20",
                     "wanda_synthetic_s0.50", "magnitude_s0.20", "magnitude_s0.50"]
    for r in results["runs"][1:]:
        # CAP's global threshold is exact; Wanda/magnitude prune int(in * s) per row/matrix of width 32..48.
        tol = 1e-4 if r["method"] == "cap" else 1 / 32
        assert abs(r["achieved_sparsity"] - r["sparsity"]) <= tol, r["name"]
    # Every number of report.md's table equals results.json (to the 4 decimals it prints).
    report = (out / "report.md").read_text()
    table = [l for l in report.splitlines() if l.startswith("| ") and not l.startswith("| method")]
    header = next(l for l in report.splitlines() if l.startswith("| method"))
    metrics = [c.strip() for c in header.strip("|").split("|")][3:]
    assert len(table) == len(results["runs"]) and "synthetic/answer_loss" in metrics
    for line, run in zip(table, results["runs"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == run["method"] and float(cells[2]) == pytest.approx(run["sparsity"])
        for name, cell in zip(metrics, cells[3:]):
            value = float(re.match(r"-?[\d.]+", cell).group())
            assert value == pytest.approx(run["metrics"][name], abs=5e-5)
    computed = [e for e in results["events"] if e.startswith("computed")]
    assert "computed scores/synthetic" in computed

    # A rerun recomputes nothing: scores, masks and evaluations come from the results folder.
    assert main(["run", str(path)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert not [e for e in again["events"] if e.startswith("computed")]
    assert "reused scores/synthetic" in again["events"]
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in results["runs"]]
    scores = np.load(out / "scores" / "synthetic.npz")
    assert scores["delta"].shape == (2, 4)


@pytest.mark.parametrize("override,match", [
    ({"calibraton": {}}, "unknown config key 'calibraton'"),
    ({"pruning": {"methods": ["cap", "obs"]}}, r"unknown pruning.methods \['obs'\]"),
    ({"evaluation": {"tasks": ["mmlu"]}}, r"unknown evaluation.tasks \['mmlu'\]"),
    ({"pruning": {"sparsities": [0.2, 1.0]}}, r"pruning.sparsities must lie in \[0, 1\), got 1.0"),
    ({"pruning": {"nm": "4:2"}}, "pruning.nm"),
    ({"calibration": {"n": 2, "subsets": 3}}, "subsets=3 exceeds calibration.n=2"),
    ({"evaluation": {"limit": 0}}, "evaluation.limit must be a positive integer"),
    ({"calibration": {"tasks": ["mmlu"]}}, r"unknown calibration.tasks"),
])
def test_config_validation_before_compute(tmp_path, override, match, capsys):
    path = _config(tmp_path, tmp_path / "no-model-here", **override)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    # The CLI reports it as one line and exits 2, before touching the (missing) model.
    assert main(["run", str(path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_overrides_and_missing_config(tmp_path):
    path = _config(tmp_path, "m")
    cfg = load_config(path, ["calibration.n=9", "pruning.methods=[cap_heads]", "seed=3"])
    assert cfg["calibration"]["n"] == 9 and cfg["pruning"]["methods"] == ["cap_heads"] and cfg["seed"] == 3
    # A mapping-valued setting (per-task limits) can be replaced by a scalar, and back.
    demo = Path(__file__).resolve().parents[1] / "configs" / "smollm2_demo.yaml"
    assert isinstance(load_config(demo)["evaluation"]["limit"], dict)
    assert load_config(demo, ["evaluation.limit=4"])["evaluation"]["limit"] == 4
    assert load_config(path, {"evaluation": {"limit": {"synthetic": 2}}})["evaluation"]["limit"] == {"synthetic": 2}
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path, ["evaluation=3"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(path, ["calibration.n"])
    with pytest.raises(ConfigError, match="config file .* not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["smollm2_demo", "paper_llama3_8b", "paper_mistral_7b"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert path.read_text().startswith("#") and "capjax run configs/" in path.read_text().splitlines()[1] + \
        path.read_text().splitlines()[2]
    load_config(path)


def test_config_vocabulary_matches_the_library():
    """experiment.py spells the task names out (validating a config imports no jax); they must not drift.
    Pruning method names are read from capjax.pruning.registry (tests/test_registry.py)."""
    from capjax import experiment
    from capjax.data import TASKS as DATA_TASKS
    from capjax.evaluate.tasks import TASKS

    assert experiment.EVAL_TASKS == tuple(TASKS)
    assert set(experiment.CALIB_TASKS) == set(DATA_TASKS) | {"synthetic"}


def test_mask_checkpoint_round_trip(tmp_path):
    """The orbax mask checkpoint a killed run resumes from gives back the same masks tree."""
    import jax

    import capjax
    from capjax.pipeline import _restore_masks, _save_masks

    make_hf_model(tmp_path / "m")
    model, params = capjax.load_pretrained(tmp_path / "m")
    _, masks = capjax.prune(model, params, "magnitude", 0.3)
    _save_masks(tmp_path / "ckpt", masks)
    restored = _restore_masks(tmp_path / "ckpt", params)
    assert jax.tree.structure(restored, is_leaf=lambda x: x is None) == \
        jax.tree.structure(masks, is_leaf=lambda x: x is None)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), b)
