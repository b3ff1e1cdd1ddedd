"""Every expected failure of the CLI is one line naming the file or field and the fix, exit 2,
before any compute where it can be known before; a non-finite result is an error, not a number."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import capjax
from capjax.cli import main
from conftest import make_hf_model, needs_smollm2
from worker_common import one_error_line


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_err")
    make_hf_model(folder, "llama")
    return folder


def test_run_rejects_a_bad_option_before_loading_in_seconds(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: smollm2-135m-instruct\n")
    t0 = time.perf_counter()
    assert main(["run", str(cfg), f"out={tmp_path}/o", "pruning.options.cap.kv_rule=bogus"]) == 2
    assert time.perf_counter() - t0 < 10
    one_error_line(capsys, "pruning.options.cap", "kv_rule='bogus'", "mean, max")
    out_file = tmp_path / "file"
    out_file.write_text("x")
    # synthetic only: without ../shared/data the missing WikiText-2 file would be reported first
    assert main(["run", str(cfg), f"out={out_file}", "evaluation.tasks=[synthetic]"]) == 2
    one_error_line(capsys, f"out={out_file} is a file")
    assert main(["run", str(cfg), f"out={tmp_path}/o", "calibration.tasks=[gsm8k]", "data_dir=/no/such"]) == 2
    one_error_line(capsys, "calibration.tasks gsm8k needs gsm8k/train.jsonl", "data_dir=/no/such")


def test_score_checks_its_output_before_scoring(tmp_path, tiny_folder, capsys):
    (tmp_path / "taken.npz").mkdir()
    assert main(["score", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "taken.npz")]) == 2
    # the output is refused first: the (missing) model is never looked at
    line = one_error_line(capsys, "taken.npz is a folder")
    assert "no-model" not in line
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert main(["score", "--model", str(tiny_folder), "--out", str(blocker / "s.npz")]) == 2
    one_error_line(capsys, "--out folder", "blocker")
    with pytest.raises(SystemExit) as e:
        main(["score", "--model", str(tiny_folder), "--chunk-size", "0", "--out", str(tmp_path / "s.npz")])
    assert e.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


@needs_smollm2
def test_score_out_without_suffix_says_the_real_path(tmp_path, tiny_with_tokenizer, capsys):
    out = tmp_path / "new" / "deeper" / "x"
    assert (
        main(
            [
                "score",
                "--model",
                str(tiny_with_tokenizer),
                "--n",
                "3",
                "--seq-len",
                "96",
                "--out",
                str(out),
                "--bootstrap",
                "100",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out}.npz" in printed and (tmp_path / "new" / "deeper" / "x.npz").exists()
    assert "heads have a 95% bootstrap interval that excludes zero" in printed
    saved = np.load(f"{out}.npz")
    assert saved["interval"].shape == (2, 2, 4)
    assert np.all(saved["interval"][0] <= saved["interval"][1])


def test_prune_refuses_bad_inputs_in_one_line(tmp_path, tiny_folder, capsys, monkeypatch):
    good = tmp_path / "good.npz"
    np.savez(good, delta=np.zeros((2, 4)))
    data = good.read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: len(data) // 2])
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_folder),
                "--method",
                "cap",
                "--scores",
                str(bad),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    one_error_line(capsys, str(bad), "not a readable .npz")
    other = tmp_path / "other_model.npz"
    np.savez(other, delta=np.zeros((3, 4)))
    with monkeypatch.context() as m:  # refused from config.json alone, before the weights load
        m.setattr(capjax, "load_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
        assert (
            main(
                [
                    "prune",
                    "--model",
                    str(tiny_folder),
                    "--method",
                    "cap",
                    "--scores",
                    str(other),
                    "--out",
                    str(tmp_path / "p"),
                ]
            )
            == 2
        )
    one_error_line(capsys, str(other), "'delta' is [3, 4]", "has [2, 4] heads")
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_folder),
                "--method",
                "magnitude",
                "--nm",
                "2:4",
                "--sparsity",
                "0.7",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    one_error_line(capsys, "--nm 2:4 fixes the sparsity at 0.5", "drop --sparsity 0.7")
    assert (
        main(
            ["prune", "--model", str(tiny_folder), "--method", "magnitude", "--nm", "4:2", "--out", str(tmp_path / "p")]
        )
        == 2
    )
    one_error_line(capsys, "--nm: need 0 < N < M")
    (tmp_path / "f").write_text("")
    assert main(["prune", "--model", str(tiny_folder), "--method", "magnitude", "--out", str(tmp_path / "f")]) == 2
    one_error_line(capsys, "is a file")
    # 2:4 alone is fine, and the sparsity it reports is the achieved one
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_folder),
                "--method",
                "magnitude",
                "--nm",
                "2:4",
                "--out",
                str(tmp_path / "nm"),
            ]
        )
        == 0
    )
    assert "50.00%" in capsys.readouterr().out


def test_damaged_weights_and_nonfinite_results(tmp_path, tiny_folder, capsys, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["eval", "--model", str(broken), "--tasks", "synthetic", "--out", str(tmp_path / "r.json")]) == 2
    one_error_line(capsys, str(broken / "model.safetensors"), "unreadable", "re-export")


@needs_smollm2
def test_nan_weights_are_an_error_not_a_number(tmp_path, tiny_with_tokenizer, capsys, monkeypatch):
    from safetensors.numpy import load_file, save_file

    nan = tmp_path / "nan"
    nan.mkdir()
    for f in tiny_with_tokenizer.iterdir():
        (nan / f.name).write_bytes(f.read_bytes())
    w = load_file(nan / "model.safetensors")
    w["model.layers.0.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(w, nan / "model.safetensors", metadata={"format": "pt"})
    assert main(["prune", "--model", str(nan), "--method", "magnitude", "--out", str(tmp_path / "p")]) == 2
    one_error_line(capsys, "NaN or Inf weights in layers/mlp/up_proj/kernel")
    assert main(["score", "--model", str(nan), "--n", "3", "--seq-len", "96", "--out", str(tmp_path / "s")]) == 2
    one_error_line(capsys, "non-finite loss", "NaN weights?")
    out = tmp_path / "r.json"
    argv = [
        "eval",
        "--model",
        str(nan),
        "--tasks",
        "synthetic",
        "--limit",
        "1",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    # found where the logits are made (generation), before any metric is computed from them
    one_error_line(capsys, f"{nan} on synthetic: generation: the model's logits are NaN/Inf")
    assert not out.exists()
    monkeypatch.setenv("CAPJAX_DEBUG", "1")
    with pytest.raises(ValueError, match="NaN/Inf"):
        main(argv)


def test_strict_json_names_the_nonfinite_value(tmp_path):
    from capjax.errors import ArtifactError
    from capjax.evaluate.tasks import write_results

    with pytest.raises(ArtifactError, match="results/wikitext2/ppl = nan"):
        write_results({"results": {"wikitext2": {"ppl": float("nan")}}}, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    path = write_results({"results": {"wikitext2": {"ppl": 3.5}}}, tmp_path / "r.json")
    assert json.loads(path.read_text())["results"]["wikitext2"]["ppl"] == 3.5


def test_recover_checks_its_output_and_data_before_training(tmp_path, tiny_folder, capsys, monkeypatch):
    pruned = tmp_path / "p"
    assert main(["prune", "--model", str(tiny_folder), "--method", "magnitude", "--out", str(pruned)]) == 0
    capsys.readouterr()
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setattr(capjax, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["recover", "--model", str(pruned), "--data", "synthetic", "--steps", "1", "--n", "2", "--seq-len", "16"]
    assert main([*base, "--out", str(blocker / "r")]) == 2
    one_error_line(capsys, f"--out={blocker / 'r'} is not a writable folder", "choose another --out")
    assert main([*base, "--out", str(tmp_path / "r"), "--checkpoint-dir", str(blocker)]) == 2
    one_error_line(capsys, f"--checkpoint-dir={blocker} is a file")
    assert main([*base[:4], "text:/no/such.txt", *base[5:], "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "recovery.data='text:/no/such.txt': text file /no/such.txt not found")


def test_eval_checks_every_tasks_data_before_loading(tmp_path, tiny_folder, capsys, monkeypatch):
    import capjax.io

    for module in (capjax, capjax.io):
        monkeypatch.setattr(module, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    out = str(tmp_path / "r.json")
    assert (
        main(["eval", "--model", str(tiny_folder), "--tasks", "wikitext2", "--data-dir", "/nonexistent", "--out", out])
        == 2
    )
    one_error_line(
        capsys,
        "missing data in --data-dir /nonexistent",
        "wikitext2 needs wikitext2/wiki.test.raw",
        "pass --data-dir DIR",
    )
    half = tmp_path / "data"
    (half / "gsm8k").mkdir(parents=True)
    (half / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_folder),
                "--tasks",
                "gsm8k,strategyqa,synthetic",
                "--data-dir",
                str(half),
                "--out",
                out,
            ]
        )
        == 2
    )
    line = one_error_line(capsys, "strategyqa needs strategyqa/dev.json")
    assert "gsm8k needs" not in line
    assert not (tmp_path / "r.json").exists()


def test_ctrl_c_is_exit_130_and_one_line(tmp_path, capsys, monkeypatch):
    import capjax.commands.eval as eval_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_command, "run", interrupted)
    assert main(["eval", "--model", "m", "--out", str(tmp_path / "r.json")]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["capjax eval: interrupted"] and "Traceback" not in err


def test_ctrl_c_during_a_real_run_is_one_line(tmp_path):
    """SIGINT to `capjax run` while it scores: status 130, one line saying a rerun resumes."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import char_tokenizer

    model = tmp_path / "m"
    make_hf_model(model, "llama", max_position_embeddings=512)
    char_tokenizer().save_pretrained(model)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {model}\nout: {tmp_path / 'out'}\ncalibration: {{n: 4, subsets: 2, seq_len: 320, "
        "bootstrap: 0}\npruning: {methods: [cap], sparsities: [0.5]}\n"
        "evaluation: {tasks: [synthetic], limit: 2, max_new_tokens: 4, bootstrap: 0}\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "JAX_PLATFORMS": "cpu"}
    # An ignored SIGINT survives exec, and Python then installs no KeyboardInterrupt handler: pytest
    # started as a background job of a non-interactive shell (`make test &`) has SIGINT ignored, and
    # the run went on to status 0. A handler in the parent is reset to the default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "capjax.cli", "run", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    for line in p.stdout:
        if line.startswith("scores:"):  # scoring has started
            break
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().endswith(
        "capjax run: interrupted; rerun the same command to resume (finished steps are reused)"
    ), err[-1000:]
