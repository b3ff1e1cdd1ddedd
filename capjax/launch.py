"""Runs a command as N JAX processes on this machine (loopback) and watches them as one job.

    python -m capjax.launch N [--devices D] [--grace S] -- capjax run configs/experiment.yaml

Each process gets CAPJAX_DISTRIBUTED=1, CAPJAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>
(CAPJAX_PORT to choose it), CAPJAX_NUM_PROCESSES=N, CAPJAX_PROCESS_ID=i, JAX_PLATFORMS=cpu
(unless set), JAX_ENABLE_PREEMPTION_SERVICE=false (unless set: JAX's preemption notifier would
catch the SIGTERM that stops a process) and XLA_FLAGS=--xla_force_host_platform_device_count=D. Output lines are
prefixed with [i]. When a process exits non-zero or is killed, the launcher prints one line

    capjax: process 1 exited with signal 9 (Killed); the job stopped; rerun the same command
    to resume from the last checkpoint in results/run1

stops the others (SIGTERM, then SIGKILL after `--grace` seconds) and exits with that
process's status (128 + signal for a signal). Ctrl-C stops them all. scripts/launch_local.sh
calls this module.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

POLL_S = 0.1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process i of n: `base` (default os.environ) plus the job's settings."""
    env = dict(os.environ if base is None else base)
    env.update(
        CAPJAX_DISTRIBUTED="1",
        CAPJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        CAPJAX_NUM_PROCESSES=str(n),
        CAPJAX_PROCESS_ID=str(i),
        JAX_PLATFORMS=env.get("JAX_PLATFORMS") or "cpu",
        XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
    )
    env.setdefault("JAX_ENABLE_PREEMPTION_SERVICE", "false")  # else JAX catches the SIGTERM that stops a process
    return env


def describe_exit(returncode: int) -> str:
    """'status 3' or 'signal 9 (Killed)' for a Popen returncode."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        name = signal.strsignal(-returncode) or signal.Signals(-returncode).name
    except ValueError:
        name = "unknown signal"
    return f"signal {-returncode} ({name})"


def run_out_folder(command: Sequence[str]) -> str | None:
    """The results folder of a `capjax run CONFIG [overrides]` command (its config's `out`, after
    the overrides), or None for any other command or an unreadable config."""
    args = list(command)
    if "run" not in args:
        return None
    rest = args[args.index("run") + 1 :]
    if not rest:
        return None
    try:
        from capjax.experiment.config import load_run_config

        return load_run_config(rest[0], rest[1:], check_files=False).out
    except Exception:  # noqa: BLE001 - the message falls back to a generic wording
        return None


def failure_line(i: int, returncode: int, command: Sequence[str]) -> str:
    """The launcher's one line for process i ending with `returncode`."""
    out = run_out_folder(command)
    where = f" in {out}" if out else ""
    return (
        f"capjax: process {i} exited with {describe_exit(returncode)}; the job stopped; "
        f"rerun the same command to resume from the last checkpoint{where}"
    )


def _pump(src: IO[str], dst: IO[str], prefix: str) -> None:
    """Copies src to dst line by line with `prefix`. A line cut off by the process's end (a
    progress bar killed mid-update) gets its newline here, so the next line (another process's,
    or the launcher's failure line) starts on a line of its own."""
    for line in src:
        dst.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
        dst.flush()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(n: int, command: Sequence[str], devices: int = 2, grace: float = 10.0, port: int | None = None) -> int:
    """Runs `command` as n processes of one job and waits for them; returns the job's exit status
    (0, or that of the first process to fail: 128 + signal for a signal)."""
    port = port or int(os.environ.get("CAPJAX_PORT") or free_port())
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for i in range(n):
        try:
            p = subprocess.Popen(
                list(command),
                env=process_env(i, n, port, devices),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
        except OSError as e:  # no such command, not executable: one line, not a traceback
            _stop(procs, grace)
            print(
                f"capjax: cannot start process {i}: {e.strerror or e}: {command[0]!r}; check the command after --",
                file=sys.stderr,
                flush=True,
            )
            return 127 if isinstance(e, FileNotFoundError) else 126
        procs.append(p)
        for src, dst in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(src, dst, f"[{i}] "), daemon=True)
            t.start()
            pumps.append(t)
        print(f"capjax: started process {i} (pid {p.pid})", file=sys.stderr, flush=True)
    status = 0
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated launcher stops its processes
    try:
        while [p.poll() for p in procs].count(None):  # every process polled: any() would stop early
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                break
            time.sleep(POLL_S)
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed:
            i, rc = failed[0]
            _stop(procs, grace)
            status = rc if rc > 0 else 128 - rc
            for t in pumps:
                t.join(timeout=1.0)
            print(failure_line(i, rc, command), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        _stop(procs, grace)
        status = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for t in pumps:
        t.join(timeout=1.0)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" is the command, whatever options it has.
    split = argv.index("--") if "--" in argv else len(argv)
    options, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m capjax.launch",
        usage="%(prog)s N [--devices D] [--grace S] -- COMMAND ...",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("n", type=int, help="number of processes")
    parser.add_argument("--devices", type=int, default=2, help="host devices per process (default 2)")
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds the others get to stop after one fails, before SIGKILL (default 10)",
    )
    args = parser.parse_args(options)
    if args.n < 1 or args.devices < 1 or args.grace < 0:
        parser.error(f"N and --devices must be positive and --grace >= 0, got {args.n}, {args.devices}, {args.grace}")
    if not command:
        parser.error("no command given after --")
    return launch(args.n, command, args.devices, args.grace)


if __name__ == "__main__":
    sys.exit(main())
