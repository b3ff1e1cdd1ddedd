#!/usr/bin/env bash
# Runs a command as N JAX processes on this machine (loopback), each with D host devices:
#
#     scripts/launch_local.sh N [--devices 2] [--grace 10] -- capjax run configs/experiment.yaml
#
# A thin wrapper over `python -m capjax.launch` (see capjax/launch.py): each process gets
# CAPJAX_DISTRIBUTED=1, CAPJAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, CAPJAX_NUM_PROCESSES=N,
# CAPJAX_PROCESS_ID=i and XLA_FLAGS=--xla_force_host_platform_device_count=D; output lines are
# prefixed with [i]. When one process exits non-zero or is killed, one `capjax: process i exited
# with ...; the job stopped; rerun the same command to resume ...` line is printed, the others
# are stopped and the script exits with that status; Ctrl-C stops all of them.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m capjax.launch "$@"
