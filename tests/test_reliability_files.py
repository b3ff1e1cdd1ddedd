"""Files are never lost, mixed or half-written: a results folder has one writer at a time, the
three result files and an export folder are replaced as a unit, a full disk names the path and
leaves no truncated file, and every file gets the umask's mode (0644 under umask 022)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import capjax
from capjax.cli import main
from conftest import char_tokenizer, make_hf_model
from worker_common import one_error_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_files")
    make_hf_model(folder, "llama")
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _no_load(monkeypatch):
    monkeypatch.setattr(capjax, "load_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))


# ---------------------------------------------------------------------------- modes
def test_every_written_file_gets_the_umasks_mode(tmp_path, umask022):
    from capjax.experiment.store import Store, atomic_write, write_text
    from capjax.report import plot_head_scores

    write_text(tmp_path / "results.json", "{}")
    atomic_write(tmp_path / "a.npz", lambda f: np.savez(f, x=np.zeros(2)))
    store = Store(tmp_path, writer=True)
    art = store.save_json("evals", "abc", {"metrics": {"a": 1.0}})
    (tmp_path / "figures").mkdir()
    plot_head_scores(np.ones((2, 3)), tmp_path / "figures" / "h.png")
    for p in ["results.json", "a.npz", art, "figures/h.png"]:
        assert _mode(tmp_path / p) == 0o644, (p, oct(_mode(tmp_path / p)))
    from capjax.experiment.store import write_texts

    write_texts({tmp_path / "report.md": "# r\n", tmp_path / "results.csv": "a\n"})
    assert _mode(tmp_path / "report.md") == _mode(tmp_path / "results.csv") == 0o644
    os.umask(0o027)
    write_text(tmp_path / "results.json", "{}")  # a replaced file takes the mode of now
    assert _mode(tmp_path / "results.json") == 0o640


# ---------------------------------------------------------------------------- a full disk
def _enospc_after_half(data: bytes):
    def write(f):
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_a_full_disk_names_the_path_and_leaves_no_truncated_file(tmp_path, monkeypatch):
    from capjax.cli import one_line
    from capjax.experiment.store import atomic_write

    target = tmp_path / "results.json"
    target.write_text('{"old": 1}')
    with pytest.raises(OSError) as e:
        atomic_write(target, _enospc_after_half(b"x" * 100))
    assert e.value.errno == errno.ENOSPC and str(target) in one_line(e.value)
    assert target.read_text() == '{"old": 1}' and sorted(os.listdir(tmp_path)) == ["results.json"]

    # a figure: matplotlib writes part of the PNG, then the disk is full
    import matplotlib.figure

    from capjax.report import plot_head_scores

    def savefig(self, f, **kw):
        f.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    png = tmp_path / "figures" / "head_scores.png"
    with pytest.raises(OSError) as e:
        plot_head_scores(np.ones((2, 3)), png)
    assert "No space left on device" in one_line(e.value) and str(png) in one_line(e.value)
    assert list((tmp_path / "figures").iterdir()) == []

    # the three result files: the third fails, so none of them is replaced
    from capjax.experiment.store import write_texts

    files = {tmp_path / n: "new" for n in ("results.json", "results.csv", "report.md")}
    (tmp_path / "results.csv").write_text("old")
    (tmp_path / "report.md").write_text("old")
    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="report.md"):
        write_texts(files)
    assert [(tmp_path / n).read_text() for n in ("results.json", "results.csv", "report.md")] == [
        '{"old": 1}',
        "old",
        "old",
    ]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.md", "results.csv", "results.json"]


def _minimal_results() -> dict:
    from capjax.experiment.config import RunConfig

    row = {
        "name": "dense",
        "method": "dense",
        "calib": None,
        "sparsity": 0.0,
        "nm": None,
        "achieved_sparsity": 0.0,
        "fingerprint": "f",
        "eval": {"synthetic": {"metrics": {"accuracy_flexible": 0.5}, "status": "computed", "fingerprint": "e"}},
    }
    from capjax.provenance import environment

    return {
        "config": RunConfig(model="m").to_dict(),
        "environment": environment(),
        "runs": [row],
        "scores": {},
        "seconds": 1.0,
        "events": [],
    }


def test_report_json_and_csv_are_replaced_together(tmp_path, monkeypatch):
    """report.md fails to be written: results.json and results.csv keep the previous run's
    content (before: they were already replaced, so the three files came from two runs)."""
    from capjax.experiment import outputs

    for name in ("results.json", "results.csv", "report.md"):
        (tmp_path / name).write_text(f"previous {name}")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "figures" / "x.png"))

    monkeypatch.setattr(outputs, "report_markdown", no_space)
    with pytest.raises(OSError):
        outputs.write_outputs(tmp_path, _minimal_results(), resamples=0)
    for name in ("results.json", "results.csv", "report.md"):
        assert (tmp_path / name).read_text() == f"previous {name}"
    monkeypatch.undo()
    outputs.write_outputs(tmp_path, _minimal_results(), resamples=0)
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["metrics"] == {
        "synthetic/accuracy_flexible": 0.5
    }
    assert "accuracy_flexible" in (tmp_path / "results.csv").read_text()
    assert (tmp_path / "report.md").read_text().startswith("# capjax run: m")


# ---------------------------------------------------------------------------- one writer per results folder
def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path, tiny_folder, capsys, monkeypatch):
    from capjax.errors import FolderInUseError
    from capjax.experiment.folders import results_lock

    out = tmp_path / "out"
    with results_lock(out):
        with pytest.raises(FolderInUseError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            with results_lock(out):
                pass
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"model: {tiny_folder}\nout: {out}\ncalibration: {{n: 2, subsets: 1, seq_len: 32, bootstrap: 0}}\n"
            "pruning: {methods: [magnitude], sparsities: [0.5]}\n"
            "evaluation: {tasks: [synthetic], limit: 1, max_new_tokens: 2, bootstrap: 0}\n"
        )
        _no_load(monkeypatch)
        assert main(["run", str(cfg)]) == 2
        one_error_line(capsys, f"results folder {out} is in use by pid {os.getpid()}", "started", "choose another out=")
    with results_lock(out):  # released: free again, without a note
        pass
    assert "taking over" not in capsys.readouterr().err


def test_the_lock_holds_across_processes(tmp_path):
    """Another process holds the lock: refused, naming that process's pid; free once it ends."""
    from capjax.errors import FolderInUseError
    from capjax.experiment.folders import results_lock

    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        from capjax.experiment.folders import results_lock
        with results_lock({str(out)!r}):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=f"in use by pid {p.pid} on host {socket.gethostname()}"):
            with results_lock(out):
                pass
    finally:
        p.communicate("\n", timeout=60)
    assert p.returncode == 0
    with results_lock(out):
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    from capjax.experiment.folders import results_lock

    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import os, signal
        from capjax.experiment.folders import results_lock
        with results_lock({str(out)!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == -9, res.stderr
    dead = json.loads((out / ".capjax-run.lock").read_text())["pid"]
    with results_lock(out):
        pass
    err = capsys.readouterr().err
    assert f"taking over the lock {out / '.capjax-run.lock'} of pid {dead}" in err and "no longer running" in err


# ---------------------------------------------------------------------------- exports
def _prune(model: Path, out: Path, *extra: str) -> int:
    return main(
        ["prune", "--model", str(model), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), *extra]
    )


def test_a_reexport_leaves_no_stale_file(tmp_path, tiny_folder, umask022):
    out = tmp_path / "p"
    assert _prune(tiny_folder, out, "--hf-masks") == 0
    assert (out / "masks_hf.npz").exists()
    assert _prune(tiny_folder, out) == 0
    assert not (out / "masks_hf.npz").exists()  # it belonged to the old export
    assert json.loads((out / "capjax_prune.json").read_text())["sparsity"] == 0.5
    for name in ("capjax_prune.json", "masks.npz", "model.safetensors", "config.json"):
        assert _mode(out / name) == 0o644, name
    assert _mode(out) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary folder left


def test_an_export_that_fails_midway_leaves_the_old_export(tmp_path, tiny_folder, monkeypatch, capsys):
    out = tmp_path / "p"
    assert _prune(tiny_folder, out, "--hf-masks") == 0
    before = _digests(out)

    def zero_bytes_then_fail(file, **arrays):
        if isinstance(file, (str, Path)):  # a path (the export before): a 0-byte masks.npz stays behind
            Path(file).write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", zero_bytes_then_fail)
    assert (
        main(["prune", "--model", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.3", "--out", str(out)])
        == 2
    )
    line = one_error_line(capsys, "No space left on device")
    assert "masks.npz" in line
    assert _digests(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_a_full_disk_while_writing_the_weights_is_one_line_and_keeps_the_old_export(
    tmp_path, tiny_folder, monkeypatch, capsys
):
    """safetensors reports a full disk as its own SafetensorError (before: a traceback)."""
    import safetensors.flax
    from safetensors import SafetensorError

    out = tmp_path / "p"
    assert _prune(tiny_folder, out) == 0
    before = _digests(out)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.flax, "save_file", full)
    assert _prune(tiny_folder, out) == 2
    one_error_line(capsys, "[Errno 28] No space left on device", "model-part-00000.safetensors")
    assert _digests(out) == before and [p.name for p in tmp_path.iterdir()] == ["p"]


def test_a_killed_export_leaves_the_old_export_and_its_leftovers_are_removed(tmp_path, tiny_folder, capsys):
    out = tmp_path / "p"
    assert _prune(tiny_folder, out) == 0
    before = _digests(out)
    code = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        def killed(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        np.savez_compressed = killed
        from capjax.cli import main
        main(["prune", "--model", {str(tiny_folder)!r}, "--method", "magnitude", "--sparsity", "0.3",
              "--hf-masks", "--out", {str(out)!r}])
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    assert _digests(out) == before  # the old export, whole
    leftovers = [p for p in tmp_path.iterdir() if p.name != "p"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".p.capjax-new-")
    assert _prune(tiny_folder, out) == 0
    assert "did not finish" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_prune_out_must_not_overwrite_the_model_or_other_files(tmp_path, tiny_folder, capsys, monkeypatch):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    before = _digests(model)
    _no_load(monkeypatch)
    link = tmp_path / "link"
    link.symlink_to(model)
    for out, relation in [
        (model, "is the --model"),
        (link, "is the --model"),
        (model / "sub", "is inside"),
        (tmp_path, "holds"),
    ]:
        assert _prune(model, out) == 2
        one_error_line(capsys, f"--out {out} {relation}", "choose another --out")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _prune(model, mine) == 2
    one_error_line(capsys, f"--out {mine} holds files and is not an earlier export", "choose a new or empty")
    assert _digests(model) == before and (mine / "notes.txt").read_text() == "keep me"


def test_prune_checks_sparsity_and_nm_before_loading_weights(tmp_path, tiny_folder, capsys, monkeypatch):
    _no_load(monkeypatch)
    for s in ("1.5", "-0.1", "1"):
        assert (
            main(
                [
                    "prune",
                    "--model",
                    str(tiny_folder),
                    "--method",
                    "magnitude",
                    "--sparsity",
                    s,
                    "--out",
                    str(tmp_path / "p"),
                ]
            )
            == 2
        )
        one_error_line(capsys, "--sparsity must be in [0, 1)", f"got {float(s):g}")
    # hidden 32, MLP 48: M=5 divides neither
    assert (
        main(
            ["prune", "--model", str(tiny_folder), "--method", "magnitude", "--nm", "1:5", "--out", str(tmp_path / "p")]
        )
        == 2
    )
    one_error_line(
        capsys,
        "M=5 needs input widths divisible by 5",
        "layers/self_attn/q_proj/kernel (32)",
        "layers/mlp/down_proj/kernel (48)",
    )
