"""`capjax.ablation.ablate(mesh=)`: the N ablations split over the "data" axis of 8 fake CPU devices
equal the unsharded result (tests/ablation_mesh_worker.py, in a subprocess: the device count must
be set before JAX initialises)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import fake_devices_worker

WORKER = Path(__file__).with_name("ablation_mesh_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return fake_devices_worker(WORKER, tmp_path_factory.mktemp("ablation_mesh") / "results.json")


@pytest.mark.slow  # an 8-fake-device worker process (~35 s): in `make test-slow`, which CI runs too
def test_sharded_ablate_equals_unsharded(results):
    assert len(results) == 6  # both specs (general vmapped path, single-head layer scan) on both meshes
    for key, r in results.items():
        assert "error" not in r, f"{key}:\n{r.get('error')}"
        # The values are sums of about 100 answer-token terms: equal to 1e-5 relative (float32 sums).
        assert r["diff"] <= 1e-5 * r["scale"] and r["intact_diff"] <= 1e-5 * r["scale"], f"{key}: {r}"
        assert r["moved"] > 1e-3, f"{key}: the ablations barely move the metric ({r['moved']})"
