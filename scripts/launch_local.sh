#!/usr/bin/env bash
# Runs a command as N JAX processes on this machine (loopback), each with DEVICES host devices:
#
#     scripts/launch_local.sh N [--devices 2] -- capjax run configs/experiment.yaml
#
# Each process gets CAPJAX_DISTRIBUTED=1, CAPJAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>,
# CAPJAX_NUM_PROCESSES=N, CAPJAX_PROCESS_ID=i and XLA_FLAGS=--xla_force_host_platform_device_count.
# Output lines are prefixed with [i]. When one process exits non-zero the others are killed and
# the script exits with that status; Ctrl-C kills all of them.
set -u
if [ $# -lt 3 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [--devices D] -- COMMAND..." >&2; exit 2
fi
N=$1; shift
DEVICES=2
if [ "$1" = "--devices" ]; then
  DEVICES=$2; shift 2
  [[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || { echo "$0: --devices must be a positive integer, got $DEVICES" >&2; exit 2; }
fi
[ "$1" = "--" ] && shift
[ $# -ge 1 ] || { echo "usage: $0 N [--devices D] -- COMMAND..." >&2; exit 2; }
PYTHON=${PYTHON:-python3}
PORT=${CAPJAX_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
declare -A rank
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap 'cleanup; exit 130' INT TERM
for ((i = 0; i < N; i++)); do
  ( export CAPJAX_DISTRIBUTED=1 CAPJAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" CAPJAX_NUM_PROCESSES="$N" \
           CAPJAX_PROCESS_ID="$i" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
           XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
    exec "$@" ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
  rank[$!]=$i
done
status=0
running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2>/dev/null; then still+=("$p"); continue; fi
    wait "$p"; rc=$?
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "launch_local: process ${rank[$p]} (pid $p) exited with status $rc; stopping the others" >&2
      cleanup
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [ ${#running[@]} -gt 0 ] && sleep 0.2
done
exit $status
