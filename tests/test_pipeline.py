"""`capjax run` end to end on a tiny random model, and config validation before any compute."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from capjax.cli import main
from capjax.experiment.config import ConfigError
from capjax.experiment.config import load_run_config as load_config
from conftest import DATA_DIR, HAS_DATA, needs_smollm2


def _config(tmp_path, model, **over):
    cfg = {
        "model": str(model),
        "out": str(tmp_path / "out"),
        "seed": 0,
        "calibration": {"tasks": ["synthetic"], "n": 6, "seq_len": 128, "subsets": 3},
        "pruning": {"methods": ["cap", "wanda", "magnitude"], "sparsities": [0.2, 0.5]},
        "evaluation": {
            "tasks": ["synthetic", "wikitext2"],
            "limit": 3,
            "max_new_tokens": 6,
            "batch_size": 4,
            "ppl_seq_len": 64,
            "skip_missing_data": True,
        },
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
    for f in [
        "results.json",
        "results.csv",
        "report.md",
        "figures/head_scores_synthetic.png",
        "figures/metrics_vs_sparsity.png",
        "figures/layer_sparsity_s0.20.png",
        "figures/layer_sparsity_s0.50.png",
    ]:
        assert (out / f).exists(), f
    results = json.loads((out / "results.json").read_text())
    # 1 scores file, 6 pruned models' masks, 7 models x 1-2 tasks of evaluations, each under its fingerprint
    assert len(list((out / "artifacts" / "scores").glob("*.npz"))) == 1
    assert len(list((out / "artifacts" / "masks").glob("*.npz"))) == 6
    assert (out / "artifacts" / "scores" / f"{results['scores']['synthetic']['fingerprint']}.npz").exists()
    names = [r["name"] for r in results["runs"]]
    assert names == [
        "dense",
        "cap_synthetic_s0.20",
        "cap_synthetic_s0.50",
        "wanda_synthetic_s0.20",
        "wanda_synthetic_s0.50",
        "magnitude_s0.20",
        "magnitude_s0.50",
    ]
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
        assert cells[0] == run["method"] and float(cells[2]) == pytest.approx(run["achieved_sparsity"], abs=5e-3)
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
    assert [r["intervals"] for r in again["runs"]] == [r["intervals"] for r in results["runs"]]
    assert {r["status"] for r in again["runs"]} == {"reused"}
    assert "Reused from earlier runs (same fingerprints): dense (reused)" in (out / "report.md").read_text()
    scores = np.load(out / "artifacts" / "scores" / f"{again['scores']['synthetic']['fingerprint']}.npz")
    assert scores["delta"].shape == (2, 4) and scores["example_masked"].shape[:2] == (2, 4)


@needs_smollm2
def test_scores_are_filed_by_ablation_kind_and_metric(tmp_path, tiny_with_tokenizer):
    """calibration.kind / metric reach score_heads, and a change of either is never served the other's
    scores from the results folder."""
    import capjax
    from capjax.experiment.runner import Experiment

    def scores(**calib):
        path = _config(tmp_path, tiny_with_tokenizer, calibration={"bootstrap": 0, **calib})
        exp = Experiment(load_config(path))
        exp.load()
        fp, s = exp.scores("synthetic")
        return exp, fp, s

    e0, fp0, zero = scores()
    e1, fp1, mean = scores(kind="mean", metric="kl")
    assert fp1 != fp0 and e1.events == ["computed scores/synthetic"]
    assert (zero.kind, zero.metric, mean.kind, mean.metric) == ("zero", "ce", "mean", "kl")
    calib = e1.calibration("synthetic")
    ref = capjax.score_heads(
        e1.model,
        e1.params,
        calib.tokens,
        calib.loss_mask,
        subsets=3,
        attention_mask=calib.attention_mask,
        progress=False,
        kind="mean",
        metric="kl",
    )
    np.testing.assert_allclose(mean.delta, ref.delta, atol=1e-6)
    assert not np.allclose(mean.baseline, zero.baseline)  # KL of the intact model is 0, its CE is not
    for kind, metric, fp, first in [("mean", "kl", fp1, mean), ("zero", "ce", fp0, zero)]:
        exp, fp_again, again = scores(kind=kind, metric=metric)
        assert fp_again == fp and exp.events == ["reused scores/synthetic"]
        assert (again.kind, again.metric) == (kind, metric)
        np.testing.assert_array_equal(again.delta, first.delta)
    for _ in range(2):  # computed, then reused: either way it says how it was made
        exp, _, grad = scores(method="gradient")
        assert grad.method == "gradient" and grad.example_masked is None
    assert exp.events == ["reused scores/synthetic"]


@pytest.mark.parametrize(
    "override,match",
    [
        ({"calibraton": {}}, "unknown config key 'calibraton'"),
        ({"pruning": {"methods": ["cap", "obs"]}}, r"unknown pruning.methods \['obs'\]"),
        ({"evaluation": {"tasks": ["mmlu"]}}, r"unknown evaluation.tasks \['mmlu'\]"),
        ({"pruning": {"sparsities": [0.2, 1.0]}}, r"pruning.sparsities must lie in \[0, 1\), got 1.0"),
        ({"pruning": {"nm": "4:2"}}, "pruning.nm"),
        ({"calibration": {"n": 2, "subsets": 3}}, "subsets=3 exceeds calibration.n=2"),
        ({"evaluation": {"limit": 0}}, "evaluation.limit must be >= 1, got 0"),
        ({"pruning": {"options": {"cap": {"kv_rule": "bogus"}}}}, "pruning.options.cap: cap option kv_rule='bogus'"),
        ({"seed": "abc"}, "seed must be an integer, got 'abc'"),
        ({"evaluation": {"ppl_seq_len": "abc"}}, "evaluation.ppl_seq_len must be an integer"),
        ({"evaluation": {"batch_size": 0}}, "evaluation.batch_size must be >= 1"),
        ({"evaluation": {"max_new_tokens": 1.5}}, "evaluation.max_new_tokens must be an integer"),
        ({"calibration": {"chunk_size": 0}}, "calibration.chunk_size must be >= 1"),
        ({"calibration": {"chat": "yes"}}, "calibration.chat must be true or false"),
        ({"pruning": {"nm": 124}}, "base-60 number 124: quote it"),
        ({"pruning": {"nm": "2:4", "sparsities": [0.3]}}, "pruning.nm=2:4 fixes the sparsity at 0.50"),
        ({"pruning": {"sparsities": [0.2, 0.2]}}, "lists a value more than once"),
        (
            {"pruning": {"options": {"wanda": {"batch_size": "8"}}}},
            "wanda option batch_size='8': expected a positive int",
        ),
        ({"recovery": {"steps": 0}}, r"recovery.steps=0: need an integer >= 1"),
        ({"recovery": {"stpes": 5}}, r"recovery: unknown key\(s\) stpes"),
        ({"recovery": {"lr": "fast"}}, r"recovery"),
        # every recovery field typed and ranged before anything loads (these once failed after pruning)
        ({"recovery": {"rank": 2.5}}, r"recovery.rank=2.5: need an integer >= 1"),
        ({"recovery": {"n": 8.0}}, r"recovery.n=8.0: need an integer >= 1"),
        ({"recovery": {"seq_len": 64.0}}, r"recovery.seq_len=64.0: need an integer >= 2"),
        ({"recovery": {"warmup_steps": 1.5}}, r"recovery.warmup_steps=1.5: need an integer >= 0"),
        ({"recovery": {"steps": True}}, r"recovery.steps=True: need an integer >= 1"),
        ({"recovery": {"alpha": float("nan")}}, r"recovery.alpha=nan: need a finite number > 0"),
        ({"recovery": {"weight_decay": float("nan")}}, r"recovery.weight_decay=nan: need a finite number >= 0"),
        ({"recovery": {"lr": "1e-4"}}, r"recovery.lr='1e-4': need a finite number > 0 \(YAML 1.1 reads 1e-4 as text"),
        ({"recovery": {"remat": "yes"}}, r"recovery.remat='yes': need true or false"),
        (
            {"recovery": {"data": "text:/no/such/file.txt"}},
            r"recovery.data='text:/no/such/file.txt': text file "
            r"/no/such/file.txt not found",
        ),
        ({"data_dir": "/no/such/data", "evaluation": {"skip_missing_data": False}}, "needs wikitext2/wiki.test.raw"),
        ({"calibration": {"tasks": ["mmlu"]}}, r"unknown calibration.tasks"),
        ({"calibration": {"kind": "noise"}}, "calibration.kind must be one of zero, mean, resample, got 'noise'"),
        ({"calibration": {"metric": "acc"}}, "calibration.metric must be one of ce, kl, got 'acc'"),
    ],
)
def test_config_validation_before_compute(tmp_path, override, match, capsys):
    path = _config(tmp_path, tmp_path / "no-model-here", **override)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    # The CLI reports it as one line and exits 2, before touching the (missing) model.
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1 and "no-model-here" not in err


def test_overrides_and_missing_config(tmp_path):
    path = _config(tmp_path, "m")
    cfg = load_config(path, ["calibration.n=9", "pruning.methods=[cap_heads]", "seed=3"])
    assert cfg.calibration.n == 9 and cfg.pruning.methods == ("cap_heads",) and cfg.seed == 3
    # A mapping-valued setting (per-task limits) can be replaced by a scalar, and back.
    demo = Path(__file__).resolve().parents[1] / "configs" / "smollm2_demo.yaml"
    assert isinstance(load_config(demo, [f"out={tmp_path}/d"]).evaluation.limit, dict)
    assert load_config(demo, ["evaluation.limit=4", f"out={tmp_path}/d"]).evaluation.limit == 4
    # nested overrides change one entry and keep the others
    cfg = load_config(path, {"evaluation": {"limit": {"synthetic": 2}}})
    assert cfg.evaluation.limit_for("synthetic") == 2 and cfg.evaluation.limit_for("wikitext2") == 3
    nested = load_config(
        demo,
        [
            "evaluation.limit.wikitext2=2",
            "pruning.options.cap.kv_rule=max",
            "pruning.options.magnitude.scope=global",
            f"out={tmp_path}/d",
        ],
    )
    assert nested.evaluation.limit_for("wikitext2") == 2
    assert nested.evaluation.limit_for("arc_challenge") == 16 and nested.evaluation.limit_for("synthetic") == 16
    assert nested.pruning.options == {"cap": {"kv_rule": "max"}, "magnitude": {"scope": "global"}}
    assert (
        load_config(path, ["evaluation.limit=5", "evaluation.limit.synthetic=1"]).evaluation.limit_for("wikitext2") == 5
    )
    # YAML 1.1 would read 2:4 as 124 (base 60); capjax's reader keeps it a ratio
    assert load_config(path, ["pruning.nm=2:4", "pruning.sparsities=null"]).pruning.targets() == (0.5,)
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
    assert (
        path.read_text().startswith("#")
        and "capjax run configs/" in path.read_text().splitlines()[1] + path.read_text().splitlines()[2]
    )
    load_config(path)


def test_config_vocabulary_matches_the_library():
    """The config, the CLI and the library read one registry per extension point; no drift."""
    from capjax.ablation.kinds import KINDS
    from capjax.ablation.metrics import METRICS
    from capjax.data import CALIB_SPLITS
    from capjax.data import TASKS as DATA_TASKS
    from capjax.evaluate.tasks import TASKS
    from capjax.experiment import config
    from capjax.pruning.methods import METHODS

    assert config.prune_method_names() == tuple(METHODS)
    assert config.ablation_kind_names() == KINDS and config.score_metric_names() == tuple(METRICS)
    assert (
        config.EVAL_TASKS
        == tuple(TASKS)
        == ("arc_challenge", "arc_challenge_cot", "gsm8k", "organism", "strategyqa", "synthetic", "wikitext2")
    )
    assert set(config.CALIB_TASKS) == set(DATA_TASKS) | {"synthetic", "organism"} == set(CALIB_SPLITS)


@needs_smollm2
def test_reuse_across_code_versions_is_said_and_recompute_reuses_nothing(
    tmp_path, tiny_with_tokenizer, capsys, monkeypatch
):
    """Artifacts record the capjax code that computed them; a rerun under other code still reuses them
    (code is not in the fingerprint) but says so in the events, the log and report.md, and
    `--recompute` computes everything again."""
    from capjax.experiment import store
    from capjax.provenance import code_version

    path = _config(
        tmp_path,
        tiny_with_tokenizer,
        calibration={"n": 3, "bootstrap": 0, "kind": "mean"},
        pruning={"methods": ["cap"], "sparsities": [0.5]},
        evaluation={"tasks": ["synthetic"], "limit": 2, "max_new_tokens": 4, "bootstrap": 0},
    )
    out = tmp_path / "out"

    def events():
        return json.loads((out / "results.json").read_text())["events"]

    with monkeypatch.context() as m:
        m.setattr(store, "code_version", lambda: "0.0.1+gdeadbeef")
        assert main(["run", str(path)]) == 0
    first = events()
    assert sorted(e.split()[1] for e in first) == [
        "evals/cap_synthetic_s0.50/synthetic",
        "evals/dense/synthetic",
        "masks/cap_synthetic_s0.50",
        "scores/synthetic",
    ]
    assert all(e.startswith("computed") for e in first)
    capsys.readouterr()

    assert main(["run", str(path)]) == 0
    log = capsys.readouterr().out
    again = events()
    assert again and all(e.startswith("reused") and e.endswith("(computed by capjax 0.0.1+gdeadbeef)") for e in again)
    assert f"computed by capjax 0.0.1+gdeadbeef (this is {code_version()}" in log
    report = (out / "report.md").read_text()
    assert "Reused although other capjax code computed them" in report and "scores/synthetic" in report
    assert "K=3, median, ablation, mean ablation, ce)" in report  # what the scores measured
    env = json.loads((out / "results.json").read_text())["environment"]
    assert env["code"] == code_version() and env["packages"]["jax"] and env["devices"]["count"] >= 1

    assert main(["run", str(path), "--recompute"]) == 0
    assert sorted(events()) == sorted(e.replace("reused", "computed").split(" (")[0] for e in again)
    assert main(["run", str(path)]) == 0
    assert all(e.startswith("reused") and "(computed by" not in e for e in events())
    assert "Reused although" not in (out / "report.md").read_text()
