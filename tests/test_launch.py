"""capjax.launch (and scripts/launch_local.sh): N processes watched as one job, one line when one dies.

The processes here are plain Python one-liners (no JAX), so these tests take seconds; the slow
`test_capjax_run_two_processes_kill_and_resume` (tests/test_multiprocess.py) kills a real
`capjax run` process under the launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capjax import launch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_SH = ROOT / "scripts" / "launch_local.sh"


def _launch(n: int, code: str, *opts: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPJAX_", "JAX_"))}
    env["PYTHON"] = sys.executable
    t = time.monotonic()
    res = subprocess.run(
        ["bash", str(LAUNCH_SH), str(n), *opts, "--", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res, time.monotonic() - t


def test_every_process_gets_its_settings_and_prefixed_output():
    code = (
        "import os; print(os.environ['CAPJAX_PROCESS_ID'], os.environ['CAPJAX_NUM_PROCESSES'], "
        "os.environ['CAPJAX_DISTRIBUTED'], os.environ['CAPJAX_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'])"
    )
    res, _ = _launch(3, code, "--devices", "4")
    assert res.returncode == 0, res.stderr
    lines = sorted(res.stdout.splitlines())
    assert [l.split()[:4] for l in lines] == [[f"[{i}]", str(i), "3", "1"] for i in range(3)]
    assert len({l.split()[4] for l in lines}) == 1 and lines[0].split()[4].startswith("127.0.0.1:")
    assert all(l.endswith("--xla_force_host_platform_device_count=4") for l in lines)


def test_a_killed_process_stops_the_job_with_one_line():
    """Process 1 kills itself with SIGKILL; process 0 would sleep 60 s (and ignores SIGTERM, so
    the launcher must escalate to SIGKILL after --grace): the job ends within seconds, with the
    launcher's line naming process 1 and the signal, and status 128 + 9."""
    code = (
        "import os, signal, time; i = int(os.environ['CAPJAX_PROCESS_ID']); "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(1.0); "
        "os.kill(os.getpid(), 9) if i == 1 else time.sleep(60)"
    )
    res, took = _launch(2, code, "--grace", "1")
    assert res.returncode == 137, (res.returncode, res.stderr)
    lines = [l for l in res.stderr.splitlines() if "exited with" in l]
    assert lines == [
        "capjax: process 1 exited with signal 9 (Killed); the job stopped; "
        "rerun the same command to resume from the last checkpoint"
    ], res.stderr
    assert took < 30, took


def test_a_line_cut_off_by_a_kill_ends_before_the_launchers_line():
    """Process 1 writes a progress bar without a newline to stderr, then is killed: its partial
    line and the launcher's failure line are two lines (the failure line was glued to the bar)."""
    code = (
        "import os, sys, time; i = int(os.environ['CAPJAX_PROCESS_ID']); "
        "sys.stderr.write(f'bar {i}: 0%'); sys.stderr.flush(); time.sleep(1.0); "
        "os.kill(os.getpid(), 9) if i == 1 else time.sleep(60)"
    )
    res, _ = _launch(2, code, "--grace", "1")
    assert res.returncode == 137, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert "[1] bar 1: 0%" in lines and "[0] bar 0: 0%" in lines, res.stderr
    assert lines[-1] == (
        "capjax: process 1 exited with signal 9 (Killed); the job stopped; "
        "rerun the same command to resume from the last checkpoint"
    ), res.stderr


def test_a_failing_process_status_is_the_jobs():
    res, took = _launch(
        2,
        "import os, sys, time; time.sleep(0.5); "
        "sys.exit(3 if os.environ['CAPJAX_PROCESS_ID'] == '0' else time.sleep(60))",
    )
    assert res.returncode == 3 and took < 30
    assert "capjax: process 0 exited with status 3; the job stopped" in res.stderr


def test_failure_line_names_the_runs_out_folder(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("model: some/model\nout: results/first\n")
    cmd = ["capjax", "run", str(config), f"out={tmp_path / 'second'}"]
    assert launch.run_out_folder(cmd) == str(tmp_path / "second")
    assert launch.failure_line(1, -9, cmd) == (
        "capjax: process 1 exited with signal 9 (Killed); the job stopped; rerun the same command to resume from "
        f"the last checkpoint in {tmp_path / 'second'}"
    )
    assert launch.run_out_folder(["capjax", "run", str(tmp_path / "absent.yaml")]) is None
    assert launch.describe_exit(2) == "status 2"


@pytest.mark.parametrize("argv", [["0", "--", "true"], ["2"], ["2", "--devices", "0", "--", "true"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        launch.main(argv)
    assert e.value.code == 2


def test_a_command_that_cannot_start_is_one_line(capsys):
    assert launch.main(["2", "--", "no_such_command_capjax"]) == 127
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "capjax: cannot start process 0: No such file or directory: "
        "'no_such_command_capjax'; check the command after --"
    ]


def test_surviving_jax_processes_stop_at_once_not_after_the_grace():
    """Both processes start JAX's distributed runtime (whose preemption notifier catches SIGTERM
    unless capjax turns it off); process 1 then fails, process 0 would sleep 120 s. The launcher's
    SIGTERM must stop process 0 at once: the job ends well before --grace 40 (before: always the
    full grace, then SIGKILL)."""
    code = (
        "import os, time; from capjax.distributed import initialize; initialize(); print('up', flush=True); "
        "time.sleep(2); os._exit(3) if os.environ['CAPJAX_PROCESS_ID'] == '1' else time.sleep(120)"
    )
    env_path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ["PYTHONPATH"], old = env_path, os.environ.get("PYTHONPATH")
    try:
        res, took = _launch(2, code, "--grace", "40", "--devices", "1", timeout=170)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert res.stdout.count("up") == 2, res.stderr[-3000:]
    assert res.returncode == 3, res.stderr[-3000:]
    assert "capjax: process 1 exited with status 3" in res.stderr
    print(f"job took {took:.1f} s")
    assert took < 30, took
