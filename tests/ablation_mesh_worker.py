"""`ablate(mesh=)` on 8 fake CPU devices, run by tests/test_ablation_mesh.py in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/ablation_mesh_worker.py OUT.json

The flag must be set before JAX initialises, hence a separate process. OUT.json maps each check
(mesh, spec, kind, metric) to the largest |sharded - unsharded| of the per-example values (sums over
answer tokens), their scale, or the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import numpy as np

from capjax import sharding
from capjax.ablation import ablate, ablation_spec, prepare_batch, single_spec
from capjax.config import ModelConfig
from capjax.model import Decoder, init_params

L, E, F, H, K, D, V = 3, 32, 48, 4, 2, 8, 101
CONFIG = ModelConfig("qwen2", V, E, F, L, H, K, D, qkv_bias=True, max_position_embeddings=64)
MODEL = Decoder(CONFIG)
B, T = 6, 12


def main(out_path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    params = jax.tree.map(lambda a: a * 5, init_params(CONFIG, seed=0))  # ablations move the loss far above noise
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    am[1, 9:] = 0
    loss = np.zeros((B, T), np.float32)
    for b in range(B):
        loss[b, 4 + b % 3 : am[b].sum()] = 1
    batch = prepare_batch(MODEL, tokens, loss, am)
    mixed = ablation_spec(CONFIG, 5, heads=rng.random((5, L, H)), mlp=rng.random((5, L)), attn=rng.random((5, L)))
    specs = {"mixed5": mixed, "single_heads": single_spec(CONFIG, "heads")}  # N = 5 and 12: padded on 8 devices
    results = {}
    checks = (
        [(m, s, "zero", "ce") for m in ("data8",) for s in specs]
        + [("data8", s, "resample", "kl") for s in specs]
        + [("data4_model2", "single_heads", "mean", "ce"), ("data4_model2", "mixed5", "mean", "ce")]
    )
    meshes = {"data8": {"data": -1}, "data4_model2": {"data": 4, "model": 2}}
    for mesh_name, spec_name, kind, metric in checks:
        mesh, spec = sharding.make_mesh(meshes[mesh_name]), specs[spec_name]
        key = f"{mesh_name}/{spec_name}/{kind}/{metric}"
        try:
            want = ablate(MODEL, params, batch, spec, kind=kind, metric=metric, chunk_size=2)
            got = ablate(MODEL, params, batch, spec, kind=kind, metric=metric, chunk_size=2, mesh=mesh)
            moved = float(np.abs(want.values - want.intact).min())
            results[key] = {
                "diff": float(np.abs(got.values - want.values).max()),
                "scale": float(max(np.abs(want.values).max(), np.abs(want.intact).max())),
                "intact_diff": float(np.abs(got.intact - want.intact).max()),
                "moved": moved,
            }
        except Exception:
            results[key] = {"error": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
