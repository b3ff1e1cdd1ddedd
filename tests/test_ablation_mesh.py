"""`capjax.ablation.ablate(mesh=)`: the N ablations split over the "data" axis of 8 fake CPU devices
equal the unsharded result (tests/ablation_mesh_worker.py, in a subprocess: the device count must
be set before JAX initialises)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ablation_mesh_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation_mesh") / "results.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=WORKER.parents[1])
    if not out.exists():
        pytest.fail(f"ablation mesh worker crashed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_sharded_ablate_equals_unsharded(results):
    assert len(results) == 6  # both specs (general vmapped path, single-head layer scan) on both meshes
    for key, r in results.items():
        assert "error" not in r, f"{key}:\n{r.get('error')}"
        # The values are sums of about 100 answer-token terms: equal to 1e-5 relative (float32 sums).
        assert r["diff"] <= 1e-5 * r["scale"] and r["intact_diff"] <= 1e-5 * r["scale"], f"{key}: {r}"
        assert r["moved"] > 1e-3, f"{key}: the ablations barely move the metric ({r['moved']})"
