#!/usr/bin/env bash
# Runs scripts/bench_device.py on an accelerator machine and keeps its output.
#   scripts/bench_device.sh [bench_device.py options]   -> ${OUT:-.}/bench_device.txt
# Needs a jax with the accelerator's plugin (e.g. pip install "jax[cuda12]"); the default run is
# sized for < 8 minutes on one H200 and is cut at 9.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
out="${OUT:-.}/bench_device.txt"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  python -c "import jax; print(jax.__version__, jax.devices())"; } | tee "$out"
timeout 540 python -u scripts/bench_device.py "$@" 2>&1 | tee -a "$out"
