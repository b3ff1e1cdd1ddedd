"""The pruning-method registry: a user's method registered with one call runs through `capjax prune`
and `capjax run`; an unknown name lists the registered ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from capjax.cli import main
from capjax.pruning import registry
from conftest import make_hf_model, needs_smollm2

CALLS: list[dict] = []


def first_fraction(job):
    """Toy method: per layer slice of each kernel, prune the first int(n * sparsity) weights in
    flattened order (independent of the values, so the expected mask is known by hand)."""
    import jax.numpy as jnp

    CALLS.append({"has_calib": job.tokens is not None, "options": dict(job.options)})
    masks = {}
    for p, w in job.kernels.items():
        n = int(np.prod(w.shape[1:]))
        kept = jnp.arange(n) >= int(n * job.sparsity)  # True = kept
        masks[p] = jnp.broadcast_to(kept.reshape(w.shape[1:]), w.shape)
    return job.kernels, masks


def expected_kept(shape, sparsity):
    n = int(np.prod(shape[1:]))
    return np.broadcast_to((np.arange(n) >= int(n * sparsity)).reshape(shape[1:]), shape)


@pytest.fixture
def toy_method():
    registry.register_method(
        "first_fraction", first_fraction, options={"note": "x"}, needs_calib=True, description="test toy"
    )
    CALLS.clear()
    yield
    registry.unregister_method("first_fraction")


def test_builtins_are_lazy_and_complete():
    assert registry.names()[:7] == ("cap", "cap_wanda", "cap_heads", "wanda", "sparsegpt", "magnitude", "random")
    s = registry.spec("cap_wanda")
    assert isinstance(s.target, str) and s.needs_scores and s.needs_calib and s.sequential
    from capjax.pruning import methods

    assert s.fn is methods.cap_wanda
    assert registry.needing_scores() == ("cap", "cap_wanda", "cap_heads", "cap_structured")
    assert registry.needing_calibration() == ("cap", "cap_wanda", "cap_heads", "wanda", "sparsegpt", "cap_structured")


def test_unknown_name_lists_registered(toy_method, tmp_path, capsys):
    with pytest.raises(
        registry.UnknownMethodError,
        match="unknown pruning method 'nope'; known methods: cap, "
        r"cap_wanda, .*random, cap_structured, first_fraction",
    ):
        registry.spec("nope")
    from capjax.pruning import prune

    with pytest.raises(ValueError, match="known methods: .*first_fraction"):
        prune(None, {}, "nope", 0.1)
    with pytest.raises(SystemExit):  # argparse: invalid choice, listing the registered names
        main(["prune", "--model", "m", "--method", "nope", "--out", str(tmp_path)])
    assert "first_fraction" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("first_fraction", first_fraction)


def test_toy_method_through_capjax_prune(toy_method, tmp_path, capsys):
    folder = tmp_path / "tiny"
    make_hf_model(folder, "llama")

    import capjax
    from capjax.pruning import PRUNABLE

    # needs_calib without --calib is refused before any compute, as for the built-ins.
    assert main(["prune", "--model", str(folder), "--method", "first_fraction", "--out", str(tmp_path / "o")]) == 2
    assert "needs --calib" in capsys.readouterr().err
    registry.register_method("first_fraction", first_fraction, replace=True)  # no calibration needed
    out = tmp_path / "pruned"
    assert (
        main(["prune", "--model", str(folder), "--method", "first_fraction", "--sparsity", "0.25", "--out", str(out)])
        == 0
    )
    assert CALLS == [{"has_calib": False, "options": {}}]
    model, params = capjax.load_pretrained(folder)
    _, reloaded = capjax.load_pretrained(out)
    with np.load(out / "masks.npz") as z:
        assert sorted(z.files) == sorted(PRUNABLE)
        for p in PRUNABLE:
            np.testing.assert_array_equal(z[p], expected_kept(z[p].shape, 0.25))
            w = params
            r = reloaded
            for k in p.split("/"):
                w, r = w[k], r[k]
            np.testing.assert_array_equal(np.asarray(r), np.where(z[p], np.asarray(w), 0))


@needs_smollm2
def test_toy_method_through_capjax_run(toy_method, tmp_path, tiny_with_tokenizer):
    cfg = {
        "model": str(tiny_with_tokenizer),
        "out": str(tmp_path / "out"),
        "seed": 0,
        "calibration": {"tasks": ["synthetic"], "n": 3, "seq_len": 128, "subsets": 1},
        "pruning": {
            "methods": ["first_fraction", "magnitude"],
            "sparsities": [0.25],
            "options": {"first_fraction": {"note": "y"}},
        },
        "evaluation": {"tasks": ["synthetic"], "limit": 2, "max_new_tokens": 2, "batch_size": 2},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    # needs_calib puts the calibration task in the run's name, and the runner passes the calibration set.
    assert names == ["dense", "first_fraction_synthetic_s0.25", "magnitude_s0.25"]
    assert CALLS == [{"has_calib": True, "options": {"note": "y"}}]
    run = results["runs"][1]
    # Every layer slice of every kernel has a width divisible by 4 here, so exactly a quarter is zero.
    assert run["achieved_sparsity"] == pytest.approx(0.25, abs=1e-9)
    assert "computed scores/synthetic" not in results["events"]  # no method needed scores

    bad = dict(cfg, pruning={**cfg["pruning"], "methods": ["first_fractionn"]})
    path.write_text(yaml.safe_dump(bad))
    assert main(["run", str(path)]) == 2


def test_plugin_file_from_the_environment(tmp_path, monkeypatch):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from capjax.pruning.registry import register_method\n"
        "register_method('from_plugin_file', 'capjax.pruning.methods:magnitude', "
        "options={'scope': 'matrix'})\n"
    )
    monkeypatch.setenv("CAPJAX_PLUGINS", str(plugin))
    try:
        assert "from_plugin_file" in registry.names()
        from capjax.pruning import methods

        assert registry.spec("from_plugin_file").fn is methods.magnitude
    finally:
        registry.unregister_method("from_plugin_file")
    monkeypatch.setenv("CAPJAX_PLUGINS", str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError, match="plugin file not found"):
        registry.names()


BROKEN_PLUGINS = {
    "syntax": ("def oops(:\n", r"syntax error at line 1: .*; fix the file"),
    "import": (
        "import capjax\nimport no_such_module_for_capjax\n",
        r"ModuleNotFoundError \(line 2\): No module named 'no_such_module_for_capjax'; fix the plugin",
    ),
    "duplicate": (
        "from capjax.pruning.registry import register_method\n"
        "register_method('magnitude', 'capjax.pruning.methods:magnitude')\n",
        r"ValueError \(line 2\): pruning method 'magnitude' is already registered",
    ),
}


@pytest.mark.parametrize("broken", ["missing", "module", *BROKEN_PLUGINS])
def test_broken_plugin_is_one_line_with_exit_2(broken, tmp_path, monkeypatch, capsys):
    """While the CLI parser is built (its --method choices load CAPJAX_PLUGINS): the entry named, the fix."""
    if broken == "missing":
        entry, want = str(tmp_path / "missing.py"), r"missing\.py: plugin file not found; fix the path"
    elif broken == "module":
        entry, want = "no_such_capjax_plugin", r"no module named 'no_such_capjax_plugin'; put its folder on PYTHONPATH"
    else:
        text, want = BROKEN_PLUGINS[broken]
        entry = str(tmp_path / f"broken_{broken}.py")
        (tmp_path / f"broken_{broken}.py").write_text(text)
    monkeypatch.setenv("CAPJAX_PLUGINS", entry)
    monkeypatch.delenv("CAPJAX_DEBUG", raising=False)
    assert main(["prune", "--help"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"capjax: error: CAPJAX_PLUGINS: {entry}"), err
    assert __import__("re").search(want, err), err
    assert "magnitude" in registry.names()  # the built-ins are untouched


def test_broken_plugin_through_python_m_has_no_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    plugin = tmp_path / "broken.py"
    plugin.write_text("x = 1 / 0\n")
    root = Path(__file__).parents[1]
    env = dict(os.environ, CAPJAX_PLUGINS=str(plugin), PYTHONPATH=str(root))
    env.pop("CAPJAX_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "capjax.cli", "prune", "--method", "cap"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"capjax: error: CAPJAX_PLUGINS: {plugin}: ZeroDivisionError (line 1): "
        "division by zero; fix the plugin or remove it from CAPJAX_PLUGINS"
    ), proc.stderr


@needs_smollm2
def test_metric_and_estimator_plugins_reach_score_and_configs(tmp_path, monkeypatch, tiny_with_tokenizer):
    """A metric and an estimator registered by a CAPJAX_PLUGINS file are names `capjax score` and a
    config accept, and give what the same function passed in Python gives."""
    import capjax
    from capjax import estimators
    from capjax.ablation import logits_metric, unregister_metric
    from capjax.data import build_calibration
    from capjax.experiment.config import ConfigError, load_run_config

    plugin = tmp_path / "my_metric.py"
    plugin.write_text(
        "import jax.numpy as jnp\n"
        "from capjax import estimators\n"
        "from capjax.ablation import register_metric\n"
        "register_metric(lambda z, y: z.max(-1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0], 'logit_gap')\n"
        "estimators.register_estimator('worst', lambda v, i, c, subsets=3: (v - i).max(axis=1))\n"
    )
    monkeypatch.setenv("CAPJAX_PLUGINS", str(plugin))
    try:
        out = tmp_path / "scores.npz"
        assert (
            main(
                [
                    "score",
                    "--model",
                    str(tiny_with_tokenizer),
                    "--n",
                    "4",
                    "--seq-len",
                    "128",
                    "--subsets",
                    "2",
                    "--metric",
                    "logit_gap",
                    "--aggregate",
                    "worst",
                    "--bootstrap",
                    "0",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        saved = capjax.HeadScores.load(out)
        assert (saved.metric, saved.aggregate) == ("logit_gap", "worst")
        model, params = capjax.load_pretrained(tiny_with_tokenizer)
        calib = build_calibration("synthetic", capjax.load_tokenizer(tiny_with_tokenizer), n=4, seq_len=128, seed=0)
        import jax.numpy as jnp

        ref = capjax.score_heads(
            model,
            params,
            calib.tokens,
            calib.loss_mask,
            2,
            "mean",
            attention_mask=calib.attention_mask,
            progress=False,
            metric=logits_metric(lambda z, y: z.max(-1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]),
        )
        np.testing.assert_allclose(saved.example_masked, ref.example_masked, atol=1e-6)
        np.testing.assert_allclose(
            saved.delta.ravel(), (ref.example_masked - ref.example_baseline).reshape(-1, 4).max(axis=1), atol=1e-6
        )
        assert np.abs(saved.example_masked - saved.example_baseline).min() > 1e-4  # every ablation moves it
        cfg = load_run_config(
            None,
            {"model": "m", "out": str(tmp_path / "o"), "calibration": {"metric": "logit_gap", "aggregate": "worst"}},
            check_files=False,
        )
        assert cfg.calibration.metric == "logit_gap"
        with pytest.raises(ConfigError, match="calibration.metric must be one of ce, kl, logit_gap, got 'gap'"):
            load_run_config(None, {"model": "m", "calibration": {"metric": "gap"}}, check_files=False)
    finally:
        unregister_metric("logit_gap")
        estimators.unregister_estimator("worst")
