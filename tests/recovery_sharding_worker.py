"""`capjax.recover` with a mesh on 4 fake CPU devices, run by tests/test_recovery.py in a subprocess.

    python tests/recovery_sharding_worker.py OUT.json

XLA's host device count must be set before JAX initialises, hence a separate process. Writes
{"max_diff": ..., "pruned_nonzero": ..., "sharded": ...} for the test to check.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from capjax import sharding  # noqa: E402
from capjax.config import ModelConfig  # noqa: E402
from capjax.model import Decoder, init_params  # noqa: E402
from capjax.pruning import prune  # noqa: E402
from capjax.pruning.importance import PRUNABLE, get_path  # noqa: E402
from capjax.recovery import recover  # noqa: E402

CONFIG = ModelConfig("llama", 101, 32, 48, 2, 4, 2, 8, max_position_embeddings=64)


def main(out: str) -> None:
    model = Decoder(CONFIG)
    params = init_params(CONFIG, seed=0)
    pruned, masks = prune(model, params, "magnitude", 0.5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 101, (8, 12)).astype(np.int32)
    loss_mask = np.zeros((8, 12), np.float32)
    loss_mask[:, 6:] = 1
    data = {"tokens": tokens, "loss_mask": loss_mask}
    kw = dict(steps=2, mode="full", batch_size=4, warmup_steps=0, lr=1e-3, remat=False, progress=False)
    ref, _ = recover(model, pruned, masks, data, **kw)
    mesh = sharding.make_mesh({"data": 2, "model": 2})
    got, _ = recover(model, pruned, masks, data, mesh=mesh, **kw)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(ref),
                                                                                   jax.tree.leaves(got)))
    nonzero = sum(int(np.sum(np.asarray(get_path(got, p))[~np.asarray(get_path(masks, p))] != 0)) for p in PRUNABLE)
    q = get_path(got, "layers/self_attn/q_proj/kernel")
    json.dump({"max_diff": diff, "pruned_nonzero": nonzero, "devices": len(q.sharding.device_set),
               "spec": str(q.sharding.spec)}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
