"""No number without a computation behind it (issue 25): NaN never becomes an accuracy, significance
needs resamples, names and fingerprints say exactly what produced a result, and scores or masks
of another model are refused. Tiny random models only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import capjax
from capjax.cli import main
from conftest import char_tokenizer, make_hf_model
from worker_common import one_error_line


@pytest.fixture(scope="module")
def tiny_char(tmp_path_factory):
    """A tiny random Llama (vocab 101) with the character tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny_char")
    make_hf_model(folder, "llama", seed=3, max_position_embeddings=256, eos_token_id=1, pad_token_id=0)
    char_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- distinct sparsities
def _row(name: str, sparsity: float, per_layer: list[float]) -> dict:
    ex = {"kind": "proportion", "num": [1.0, 0.0, 1.0], "den": [1.0] * 3, "transform": "identity"}
    ev = {
        "synthetic": {
            "metrics": {"accuracy_flexible": 2 / 3},
            "examples": {"accuracy_flexible": ex},
            "fingerprint": name,
            "status": "computed",
        }
    }
    return {
        "name": name,
        "method": name.split("_")[0],
        "calib": None,
        "sparsity": sparsity,
        "nm": None,
        "achieved_sparsity": sparsity,
        "per_layer_sparsity": per_layer,
        "eval": ev,
    }


def test_close_sparsities_get_distinct_names_and_figures(tmp_path):
    """sparsities [0.1, 0.104] used to give two runs named magnitude_s0.10 and one per-layer figure
    (the second overwrote the first)."""
    from capjax.experiment.config import PruningConfig, RunConfig
    from capjax.experiment.outputs import write_outputs
    from capjax.experiment.runner import plan_runs
    from capjax.provenance import environment

    cfg = RunConfig(
        model="m", out=str(tmp_path), pruning=PruningConfig(methods=("magnitude",), sparsities=(0.1, 0.104, 0.5))
    )
    names = [r["name"] for r in plan_runs(cfg)]
    assert names == ["magnitude_s0.10", "magnitude_s0.104", "magnitude_s0.50"]  # 2 decimals where they are exact
    rows = [_row("dense", 0.0, [])] + [_row(n, s, [s, s]) for n, s in zip(names, (0.1, 0.104, 0.5))]
    (tmp_path / "figures").mkdir()
    write_outputs(
        tmp_path,
        {"config": cfg.to_dict(), "environment": environment(), "runs": rows, "events": [], "seconds": 1.0},
        resamples=0,
    )
    figures = sorted(p.name for p in (tmp_path / "figures").glob("layer_sparsity_*.png"))
    assert figures == ["layer_sparsity_s0.10.png", "layer_sparsity_s0.104.png", "layer_sparsity_s0.50.png"]
    assert "magnitude_s0.104 0.104" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------- too few resamples
def test_too_few_resamples_say_no_test_not_ns():
    """evaluation.bootstrap=0 or 1 marked every row "n.s." from no or one resample; below
    MIN_RESAMPLES there is no interval and no test, and the table says so."""
    from capjax import report, stats

    rng = np.random.default_rng(0)
    a = {"num": rng.normal(0, 1, 30).tolist(), "den": [1.0] * 30}
    b = {"num": (np.asarray(a["num"]) + 0.5).tolist(), "den": [1.0] * 30}  # a shift far outside the noise
    assert stats.paired_difference(a, b, resamples=stats.MIN_RESAMPLES).significant is True
    for few in (0, 1, stats.MIN_RESAMPLES - 1):
        d = stats.paired_difference(a, b, resamples=few)
        assert d.significant is None and np.isnan(d.low), few
        assert np.isnan(stats.bootstrap_ratio(a["num"], a["den"], resamples=few).low)
    dense = {"method": "dense", "sparsity": 0.0, "metrics": {"t/m": 1.0}}
    rows = [
        dense,
        {
            "method": "x",
            "sparsity": 0.5,
            "metrics": {"t/m": 2.0},
            "vs_dense": {"t/m": stats.paired_difference(a, b, resamples=1).to_dict()},
        },
        {
            "method": "y",
            "sparsity": 0.5,
            "metrics": {"t/m": 1.01},
            "vs_dense": {"t/m": stats.paired_difference(a, a, resamples=200).to_dict()},
        },
    ]
    table = report.markdown_table(rows, relative_to=dense).splitlines()
    assert table[3].endswith("2.0000 (+100.0%, no test) |") and table[4].endswith("(+1.0%, n.s.) |")


@pytest.fixture(scope="module")
def scored_once(tmp_path_factory, tiny_char):
    """`capjax score --bootstrap 1` of tiny_char: (scores file, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("scored") / "one.npz"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            main(
                [
                    "score",
                    "--model",
                    str(tiny_char),
                    "--calib",
                    "synthetic",
                    "--n",
                    "4",
                    "--seq-len",
                    "250",
                    "--subsets",
                    "2",
                    "--bootstrap",
                    "1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    return out, printed.getvalue()


def test_score_with_one_resample_says_no_test(scored_once):
    """`capjax score --bootstrap 1` said "8 of 8 heads have a 95% interval that excludes zero"."""
    from capjax import stats
    from capjax.attribution import HeadScores

    path, printed = scored_once
    assert "heads have a 95%" not in printed
    assert f"no test of the heads against zero: --bootstrap 1 is below the {stats.MIN_RESAMPLES} resamples" in printed
    one = HeadScores.load(path)
    assert one.interval is None and one.with_interval(stats.MIN_RESAMPLES - 1).interval is None
    assert one.with_interval(stats.MIN_RESAMPLES).interval.shape == (2, 2, 4)
    with pytest.raises(ValueError, match="resamples give no 95% interval"):
        stats.head_interval(one.example_masked, one.example_baseline, one.answer_count, resamples=1)


# ---------------------------------------------------------------------------- gradient x kl
def test_gradient_kl_is_refused_before_compute(tmp_path, capsys):
    """Gradient scores of the KL from the intact model are float noise (its gradient is zero there):
    refused in the config, by `capjax score` before the model loads, and by score_heads."""
    from capjax.experiment.config import ConfigError, load_run_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tmp_path / 'no-model'}\nout: {tmp_path / 'out'}\nevaluation: {{tasks: [synthetic]}}\n")
    with pytest.raises(ConfigError, match="calibration: method=gradient with metric=kl measures float noise"):
        load_run_config(cfg, ["calibration.method=gradient", "calibration.metric=kl"])
    assert load_run_config(cfg, ["calibration.method=ablation", "calibration.metric=kl"]).calibration.metric == "kl"
    assert (
        main(
            [
                "score",
                "--model",
                str(tmp_path / "no-model"),
                "--calib",
                "synthetic",
                "--method",
                "gradient",
                "--metric",
                "kl",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method=gradient with metric=kl" in err[0]  # not "model not found": before loading
    make_hf_model(tmp_path / "m", "llama")
    model, params = capjax.load_pretrained(tmp_path / "m")
    tokens = np.random.RandomState(0).randint(0, 101, (3, 10))
    loss = np.zeros((3, 10), np.float32)
    loss[:, 5:] = 1
    with pytest.raises(ValueError, match="metric=kl measures float noise"):
        capjax.score_heads(model, params, tokens, loss, subsets=1, method="gradient", metric="kl", progress=False)


def test_scores_indistinguishable_from_zero_are_not_pruned_by(tmp_path):
    """Min-max scaling stretched 1e-11 noise over importance 1-10; such scores are refused, real
    small scores (1e-3) and all-equal scores (importance 1: magnitude) are not."""
    from capjax.attribution import HeadScores
    from capjax.pruning.importance import importance_from_scores

    make_hf_model(tmp_path / "m", "llama")
    model, params = capjax.load_pretrained(tmp_path / "m")
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1e-11, (2, 4))
    scores = HeadScores(noise, np.full((1, 2, 4), 3.0) + noise, np.array([3.0]))
    for s in (scores, noise):
        with pytest.raises(ValueError, match="indistinguishable from zero"):
            capjax.prune(model, params, "cap", 0.5, head_scores=s)
    small = rng.normal(0, 1e-3, (2, 4))
    I = np.asarray(importance_from_scores(HeadScores(small, np.full((1, 2, 4), 3.0) + small, np.array([3.0]))))
    np.testing.assert_allclose(I, 1 + 9 * (small - small.min()) / (small.max() - small.min()), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(importance_from_scores(np.zeros((2, 4)))), np.ones((2, 4)))
    # the loss scale counts: 1e-5 is noise next to a loss of 1e3, not next to a loss of 3
    big = HeadScores(small * 1e-2, np.full((1, 2, 4), 1e3), np.array([1e3]))
    with pytest.raises(ValueError, match="loss scale 1e\\+03"):
        importance_from_scores(big)


# ---------------------------------------------------------------------------- scoring checkpoints
def _tiny_batch(seed: int = 0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 101, (4, 12))
    loss = np.zeros((4, 12), np.float32)
    loss[:, 6:] = 1
    return tokens, loss


def test_scoring_checkpoints_are_stamped_with_the_code_and_resume_false_reads_none(tmp_path, monkeypatch, capsys):
    """A layer group saved by other capjax code is recomputed (with a line saying so), and
    resume=False (what `capjax run --recompute` passes) restores no group at all."""
    from capjax import attribution, provenance

    make_hf_model(tmp_path / "m", "llama")
    model, params = capjax.load_pretrained(tmp_path / "m")
    tokens, loss = _tiny_batch()
    ckpt = tmp_path / "ckpt"
    kw = dict(subsets=1, progress=False, checkpoint_dir=ckpt, layers_per_call=1)
    truth = capjax.score_heads(model, params, tokens, loss, **kw)
    [fp_dir] = ckpt.iterdir()
    assert sorted(p.name for p in fp_dir.iterdir()) == ["layers_0000", "layers_0001"]  # the stamps are inside

    def tamper(code: str | None) -> None:  # a group whose numbers are not what this code computes
        with monkeypatch.context() as m:
            m.setattr(provenance, "code_version", lambda: code)
            store = attribution._GroupStore(ckpt, fp_dir.name)
            store.save(0, truth.example_masked[:1] + 1.0)

    tamper(provenance.code_version())
    resumed = capjax.score_heads(model, params, tokens, loss, **kw)  # same code: the group is reused
    np.testing.assert_allclose(resumed.example_masked[0], truth.example_masked[0] + 1.0)
    again = capjax.score_heads(model, params, tokens, loss, resume=False, **kw)
    np.testing.assert_array_equal(again.example_masked, truth.example_masked)

    tamper("0.0.1+gdeadbeef")
    capsys.readouterr()
    other = capjax.score_heads(model, params, tokens, loss, **kw)
    np.testing.assert_array_equal(other.example_masked, truth.example_masked)
    assert "was computed by capjax 0.0.1+gdeadbeef" in capsys.readouterr().err
    tamper(None)  # a group that records no code
    capjax.score_heads(model, params, tokens, loss, **kw)
    assert "computed by capjax of an unrecorded version" in capsys.readouterr().err


def _run_config(tmp_path: Path, model: Path, **sections) -> Path:
    import yaml

    cfg = {
        "model": str(model),
        "out": str(tmp_path / "out"),
        "seed": 0,
        "calibration": {"tasks": ["synthetic"], "n": 3, "seq_len": 250, "subsets": 1, "chat": False, "bootstrap": 0},
        "pruning": {"methods": ["cap"], "sparsities": [0.5]},
        "evaluation": {"tasks": ["synthetic"], "limit": 2, "max_new_tokens": 2, "batch_size": 2, "bootstrap": 0},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_recompute_restores_no_scoring_checkpoint(tmp_path, tiny_char):
    """`capjax run --recompute` restored checkpoints/scores/ groups, so a stale group survived into
    scores labelled "computed"."""
    from capjax import attribution

    path = _run_config(tmp_path, tiny_char)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    first = json.loads((out / "results.json").read_text())["scores"]["synthetic"]
    # the run's scores artifact records its model too, so `capjax prune --scores` can check it
    meta = json.loads(str(np.load(out / first["file"])["meta"]))
    from capjax.identity import model_identity

    assert (meta["model"], meta["model_id"]) == (str(tiny_char), model_identity(tiny_char))
    [fp_dir] = (out / "checkpoints" / "scores").iterdir()
    store = attribution._GroupStore(out / "checkpoints" / "scores", fp_dir.name)
    store.save(0, store.load(0) + 1.0)  # a stale group, stamped with this code
    assert main(["run", str(path), "--recompute"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert "computed scores/synthetic" in again["events"]
    np.testing.assert_allclose(again["scores"]["synthetic"]["delta"], first["delta"], rtol=1e-12)


def test_run_refuses_old_layout_scoring_checkpoints_in_one_line_and_recompute_replaces_them(
    tmp_path, tiny_char, capsys
):
    """Layer groups written by capjax before orbax's CheckpointManager (PyTreeCheckpointer folders,
    `.code` stamps) are refused in one line naming the folder and the fix; `--recompute` replaces them."""
    import shutil

    import orbax.checkpoint as ocp

    from capjax.checkpoints import old_layout
    from capjax.provenance import code_version

    path = _run_config(tmp_path, tiny_char)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    [fp_dir] = (out / "checkpoints" / "scores").iterdir()
    groups = sorted(p.name for p in fp_dir.iterdir())
    shutil.rmtree(fp_dir)
    for name in groups:  # what the old _GroupStore wrote
        ocp.PyTreeCheckpointer().save(fp_dir / name, {"nll": np.zeros((1, 4, 3))}, force=True)
        (fp_dir / f"{name}.code").write_text(code_version() + "\n")
    shutil.rmtree(out / "artifacts" / "scores")  # so the scores are computed again
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    one_error_line(capsys, str(fp_dir), "old layout", "delete it, or rerun with --recompute")
    assert main(["run", str(path), "--recompute"]) == 0
    assert old_layout(fp_dir, "layers") == [] and sorted(p.name for p in fp_dir.iterdir()) == groups


# ---------------------------------------------------------------------------- plugin code and data files
PLUGIN = """import jax.numpy as jnp
import numpy as np

OFFSET = {offset}


def every_other(job):
    masks = {{p: jnp.asarray((np.arange(w.size).reshape(w.shape) + OFFSET) % 2 == 0) for p, w in job.kernels.items()}}
    return job.kernels, masks
"""


def _load_plugin(path: Path, offset: int):
    import importlib.util

    from capjax.pruning import registry

    path.write_text(PLUGIN.format(offset=offset))
    spec = importlib.util.spec_from_file_location(f"capjax_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registry.register_method("every_other", module.every_other, replace=True)


def _events(out: Path) -> list[str]:
    return json.loads((out / "results.json").read_text())["events"]


def test_plugin_method_code_enters_the_fingerprint(tmp_path, tiny_char):
    """A plugin method whose code changed had its masks and evaluations reused with no note."""
    from capjax.pruning import registry

    path = _run_config(tmp_path, tiny_char, pruning={"methods": ["every_other"], "sparsities": [0.5]})
    plugin = tmp_path / "plug.py"
    try:
        _load_plugin(plugin, 0)
        assert main(["run", str(path)]) == 0
        assert "computed masks/every_other_s0.50" in _events(tmp_path / "out")
        _load_plugin(plugin, 0)  # the same code again: reused
        assert main(["run", str(path)]) == 0
        assert "reused masks/every_other_s0.50" in _events(tmp_path / "out")
        _load_plugin(plugin, 1)  # other code, other masks
        assert main(["run", str(path)]) == 0
        events = _events(tmp_path / "out")
        assert {"computed masks/every_other_s0.50", "computed evals/every_other_s0.50/synthetic"} <= set(events)
    finally:
        registry.unregister_method("every_other")


def test_code_digest_follows_the_user_code():
    """Built-ins are capjax's code (None); a user's function, partial, jitted function and a
    capjax wrapper around a user's function are keyed by the user's code."""
    import functools

    import jax

    from capjax.ablation.metrics import CE, logits_metric
    from capjax.provenance import code_digest
    from capjax.pruning.methods import magnitude

    def mine(z, y):
        return z[..., 0] - y

    assert code_digest(magnitude) is None and code_digest(CE.fn) is None
    here = code_digest(mine)
    assert here is not None and len(here) == 20
    assert code_digest(functools.partial(mine, 1.0)) == here == code_digest(jax.jit(mine))
    assert code_digest(logits_metric(mine).fn) == here


def test_recovery_text_file_content_enters_the_fingerprint(tmp_path, tiny_char):
    """A recovery `text:` data file whose content changed had its recovery run reused."""
    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    recovery = {
        "steps": 1,
        "data": f"text:{text}",
        "n": 2,
        "seq_len": 64,
        "batch_size": 2,
        "mode": "full",
        "warmup_steps": 0,
    }
    path = _run_config(tmp_path, tiny_char, pruning={"methods": ["magnitude"], "sparsities": [0.5]}, recovery=recovery)
    assert main(["run", str(path)]) == 0
    assert "computed recovery/magnitude_s0.50+recovery" in _events(tmp_path / "out")
    assert main(["run", str(path)]) == 0
    assert "reused recovery/magnitude_s0.50+recovery" in _events(tmp_path / "out")
    text.write_text("pack my box with five dozen liquor jugs! " * 20)
    assert main(["run", str(path)]) == 0
    assert "computed recovery/magnitude_s0.50+recovery" in _events(tmp_path / "out")


# ---------------------------------------------------------------------------- scores and masks of another model
def test_prune_refuses_scores_of_another_model(tmp_path, tiny_char, scored_once, capsys):
    """`capjax prune --model A2 --scores s.npz` where s.npz scored model A (same shape) was accepted."""
    from capjax.identity import model_identity

    scores, _ = scored_once
    other = tmp_path / "a2"
    make_hf_model(other, "llama", seed=4, max_position_embeddings=256, eos_token_id=1, pad_token_id=0)
    char_tokenizer().save_pretrained(other)
    assert model_identity(other) != model_identity(tiny_char)
    capsys.readouterr()
    assert (
        main(
            ["prune", "--model", str(other), "--method", "cap", "--scores", str(scores), "--out", str(tmp_path / "p2")]
        )
        == 2
    )
    one_error_line(capsys, f"--scores {scores} scored {tiny_char}", f"not --model {other}", "score this model")
    assert not (tmp_path / "p2" / "config.json").exists()
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_char),
                "--method",
                "cap",
                "--scores",
                str(scores),
                "--out",
                str(tmp_path / "p1"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "p1" / "capjax_prune.json").read_text())
    assert record["model_id"] == model_identity(tiny_char)
    # a scores file that records no model cannot be checked: said in a warning line, not refused
    delta = np.load(scores)["delta"]
    np.savez(tmp_path / "bare.npz", delta=delta)
    capsys.readouterr()
    assert (
        main(
            [
                "prune",
                "--model",
                str(other),
                "--method",
                "cap",
                "--scores",
                str(tmp_path / "bare.npz"),
                "--out",
                str(tmp_path / "p3"),
            ]
        )
        == 0
    )
    assert "does not record the model it scored" in capsys.readouterr().err


def test_recover_refuses_masks_of_another_pruning(tmp_path, tiny_char, capsys):
    """`capjax recover --masks` from another pruning of the same shape was accepted (and recovery
    then zeroed weights the model keeps)."""
    from capjax.pruning.prune import masks_digest, read_masks_npz

    for method in ("magnitude", "random"):
        assert (
            main(
                [
                    "prune",
                    "--model",
                    str(tiny_char),
                    "--method",
                    method,
                    "--sparsity",
                    "0.5",
                    "--out",
                    str(tmp_path / method),
                ]
            )
            == 0
        )
    mine, theirs = tmp_path / "magnitude", tmp_path / "random"
    recorded = json.loads((mine / "capjax_prune.json").read_text())["masks_digest"]
    ours, other = (masks_digest(read_masks_npz(d / "masks.npz")) for d in (mine, theirs))
    assert recorded == ours != other
    args = [
        "recover",
        "--model",
        str(mine),
        "--data",
        "synthetic",
        "--steps",
        "1",
        "--n",
        "2",
        "--seq-len",
        "250",
        "--batch-size",
        "2",
        "--mode",
        "full",
        "--warmup-steps",
        "0",
    ]
    capsys.readouterr()
    assert main([*args, "--masks", str(theirs / "masks.npz"), "--out", str(tmp_path / "r1")]) == 2
    one_error_line(capsys, f"--masks {theirs / 'masks.npz'} are not the masks of this pruning", str(mine / "masks.npz"))
    (mine / "capjax_prune.json").unlink()  # no record: the weights themselves say the masks do not fit
    assert main([*args, "--masks", str(theirs / "masks.npz"), "--out", str(tmp_path / "r2")]) == 2
    one_error_line(capsys, "that", "keeps (nonzero): the masks come from another pruning")
    copy = tmp_path / "copy.npz"
    with np.load(mine / "masks.npz") as z:
        np.savez(copy, **{k: z[k] for k in z.files})
    assert main([*args, "--masks", str(copy), "--out", str(tmp_path / "r3")]) == 0


# ---------------------------------------------------------------------------- NaN and token ids
@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory):
    """tiny_char's architecture with one NaN in model.norm, saved as an HF folder with its tokenizer."""
    import torch

    folder = tmp_path_factory.mktemp("nan_norm")
    hf = make_hf_model(folder, "llama", seed=3, max_position_embeddings=256, eos_token_id=1, pad_token_id=0)
    with torch.no_grad():
        hf.model.norm.weight[5] = float("nan")
    hf.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_nan_logits_are_an_error_in_every_task_mode(nan_folder):
    """A NaN weight gave accuracies of 0.0 (argmax of NaN logits is token 0, an argmax over NaN
    log-likelihoods the first choice): generation, log-likelihood, perplexity and answer loss
    each refuse, and evaluate names the model and the task."""
    from capjax.errors import NonFiniteError
    from capjax.evaluate import continuation_logprobs, evaluate, generate, perplexity
    from capjax.evaluate.tasks import answer_loss, arc_loglikelihood

    model, params = capjax.load_pretrained(nan_folder)
    tok = capjax.load_tokenizer(nan_folder)
    with pytest.raises(NonFiniteError, match="generation: the model's logits are NaN/Inf"):
        generate(model, params, [[5, 6, 7], [8]], max_new_tokens=3, eos_ids=[])
    with pytest.raises(NonFiniteError, match="log-likelihood: .* are NaN/Inf"):
        continuation_logprobs(model, params, [([5, 6], [7, 8])])
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        perplexity(model, params, np.arange(40) % 90 + 3, seq_len=16)
    records = [{"question": "1+1", "choices": [("A", "2"), ("B", "3")], "answer_label": "A", "answer": "A"}]
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        arc_loglikelihood(model, params, tok, records)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        answer_loss(
            model, params, tok, [{"question": "1+1", "answer": "2", "reasoning": ""}], task="synthetic", chat=False
        )
    with pytest.raises(NonFiniteError, match=r"^nan-model on synthetic: generation: the model's logits are NaN"):
        evaluate(model, params, tok, ["synthetic"], limit=2, max_new_tokens=2, model_name="nan-model", progress=False)


def test_capjax_eval_of_a_nan_model_is_one_line(nan_folder, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--model",
                str(nan_folder),
                "--tasks",
                "synthetic",
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )
    one_error_line(capsys, f"{nan_folder} on synthetic: generation: the model's logits are NaN/Inf")
    assert not (tmp_path / "r.json").exists()


def test_token_ids_outside_the_vocabulary_are_refused(tiny_char):
    """A tokenizer of 101 tokens with a 60-token model: an id of 500 gave NaN logits and -3 wrapped
    around. Every entry point with concrete ids refuses them; under jit nothing is checked."""
    import jax
    import jax.numpy as jnp

    from capjax.evaluate import generate, token_logprobs
    from capjax.token_ids import TokenIdError

    model, params = capjax.load_pretrained(tiny_char)
    V = model.config.vocab_size
    good = np.array([[3, 4, 5, V - 1]])
    for bad_id in (V, 500, -3):
        bad = good.copy()
        bad[0, 2] = bad_id
        with pytest.raises(TokenIdError, match=rf"token id {bad_id} is outside the model's vocabulary \[0, {V}\)"):
            model.apply({"params": params}, bad)
        with pytest.raises(TokenIdError, match=f"token id {bad_id}"):
            model.apply({"params": params}, jnp.asarray(bad))
        with pytest.raises(TokenIdError, match=f"prompt: token id {bad_id}"):
            generate(model, params, [[3, 4], bad[0].tolist()], max_new_tokens=2)
        with pytest.raises(TokenIdError, match=f"token id {bad_id}"):
            token_logprobs(model, params, bad)
        with pytest.raises(TokenIdError, match=f"calibration tokens: token id {bad_id}"):
            capjax.score_heads(model, params, bad, np.ones(bad.shape, np.float32), subsets=1, progress=False)
        with pytest.raises(TokenIdError, match=f"calibration tokens: token id {bad_id}"):
            capjax.prune(model, params, "wanda", 0.5, calib={"tokens": bad, "attention_mask": np.ones_like(bad)})
    # padding ids count too (a masked value still enters attention as 0 x NaN); jitted forwards are untouched
    with pytest.raises(TokenIdError, match=f"token id {V + 7}"):
        token_logprobs(model, params, np.array([[3, 4, V + 7]]), np.array([[1, 1, 0]]))
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray(good))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply({"params": params}, good)), atol=1e-6)


def test_plugin_metric_code_enters_the_scores_fingerprint(tmp_path):
    """Scores measured by a plugin metric are filed under its code: changed code, other scores."""
    import importlib.util

    from capjax.ablation.metrics import register_metric, unregister_metric
    from capjax.experiment.config import CalibrationConfig, RunConfig
    from capjax.experiment.runner import Experiment

    def fingerprint_with(body: str) -> str:
        path = tmp_path / "metric_plugin.py"
        path.write_text(f"def gap(logits, target):\n    return {body}\n")
        spec = importlib.util.spec_from_file_location("capjax_plugin_metric_plugin", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        register_metric(module.gap, "gap", replace=True)
        exp = Experiment(RunConfig(model="m", out=str(tmp_path / "out"), calibration=CalibrationConfig(metric="gap")))
        exp.model_fp, exp.calibs["synthetic"], exp.calib_fps["synthetic"] = "model", object(), "calibration"
        return exp.scores_fingerprint("synthetic")

    try:
        first = fingerprint_with("logits.max(-1) - logits[..., 0]")
        assert fingerprint_with("logits.max(-1) - logits[..., 0]") == first
        assert fingerprint_with("logits.max(-1) - logits[..., 1]") != first
    finally:
        unregister_metric("gap")


def test_plugin_kind_code_enters_the_scores_fingerprint(tmp_path):
    """Scores under a plugin ablation kind are filed under its code: changed code, other scores."""
    import importlib.util

    from capjax.ablation.kinds import register_kind, unregister_kind
    from capjax.experiment.config import CalibrationConfig, RunConfig
    from capjax.experiment.runner import Experiment

    def fingerprint_with(scale: str) -> str:
        path = tmp_path / "kind_plugin.py"
        path.write_text(
            "from capjax.ablation.kinds import replacements\n\n"
            "def half(model, params, batch, seed):\n"
            f"    return {{k: {scale} * v for k, v in replacements(model, params, batch, 'mean', seed).items()}}\n"
        )
        spec = importlib.util.spec_from_file_location("capjax_plugin_kind_plugin", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        register_kind("half", module.half, replace=True)
        exp = Experiment(RunConfig(model="m", out=str(tmp_path / "out"), calibration=CalibrationConfig(kind="half")))
        exp.model_fp, exp.calibs["synthetic"], exp.calib_fps["synthetic"] = "model", object(), "calibration"
        return exp.scores_fingerprint("synthetic")

    try:
        first = fingerprint_with("0.5")
        assert fingerprint_with("0.5") == first
        assert fingerprint_with("0.25") != first
    finally:
        unregister_kind("half")


def test_run_recompute_does_not_resume_recovery(tmp_path, tiny_char):
    """`--recompute` resumed a recovery run from its orbax checkpoints (a finished run's last step
    came back without training); the run's checkpoint folder is cleared and the steps are trained."""
    recovery = {
        "steps": 2,
        "data": "synthetic",
        "n": 2,
        "seq_len": 250,
        "batch_size": 2,
        "mode": "full",
        "warmup_steps": 0,
        "checkpoint_every": 1,
    }
    path = _run_config(tmp_path, tiny_char, pruning={"methods": ["magnitude"], "sparsities": [0.5]}, recovery=recovery)
    assert main(["run", str(path)]) == 0
    steps = sorted((tmp_path / "out" / "checkpoints" / "recovery").glob("*/*/step_*"))  # <run fp>/<state fp>/
    assert [p.name for p in steps] == ["step_0000001", "step_0000002"]
    (steps[1] / "stale").write_text("from the first run")
    assert main(["run", str(path), "--recompute"]) == 0
    assert "computed recovery/magnitude_s0.50+recovery" in _events(tmp_path / "out")
    assert steps[1].is_dir() and not (steps[1] / "stale").exists()  # trained again, not restored
