"""`capjax.recover` with a mesh on fake CPU devices, run by tests/test_recovery.py in a subprocess.

    python tests/recovery_sharding_worker.py OUT.json [full|lora]

full (default): 4 devices, mesh {"data": 2, "model": 2}; lora: 8 devices, mesh {"data": 4, "model": 2}.
XLA's host device count must be set before JAX initialises, hence a separate process. Writes
{"max_diff", "max_loss_diff", "pruned_nonzero", "devices", "spec"} for the test to check.
"""

from __future__ import annotations

import json
import os
import sys

MODE = sys.argv[2] if len(sys.argv) > 2 else "full"
DEVICES, MESH = {"full": (4, {"data": 2, "model": 2}), "lora": (8, {"data": 4, "model": 2})}[MODE]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
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
    kw = dict(steps=2, mode=MODE, batch_size=4, warmup_steps=0, lr=1e-3, remat=False, progress=False)
    if MODE == "lora":
        kw["rank"] = 4
    ref, ref_hist = recover(model, pruned, masks, data, **kw)
    mesh = sharding.make_mesh(MESH)
    got, got_hist = recover(model, pruned, masks, data, mesh=mesh, **kw)
    diff = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))
    )
    nonzero = sum(int(np.sum(np.asarray(get_path(got, p))[~np.asarray(get_path(masks, p))] != 0)) for p in PRUNABLE)
    q = get_path(got, "layers/self_attn/q_proj/kernel")
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(got))
    )
    loss_diff = float(np.abs(np.asarray(ref_hist["loss"]) - np.asarray(got_hist["loss"])).max())
    json.dump(
        {
            "max_diff": diff,
            "max_loss_diff": loss_diff,
            "moved": moved,
            "mode": got_hist["mode"],
            "pruned_nonzero": nonzero,
            "devices": len(q.sharding.device_set),
            "spec": str(q.sharding.spec),
        },
        open(out, "w"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
