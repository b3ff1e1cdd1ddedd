"""One process of a multi-process JAX job, run by tests/test_multiprocess.py (2 processes x 2 host
devices on loopback):

    CAPJAX_DISTRIBUTED=1 CAPJAX_COORDINATOR_ADDRESS=127.0.0.1:PORT CAPJAX_NUM_PROCESSES=2 \
    CAPJAX_PROCESS_ID=i XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multiprocess_worker.py OUT_DIR check_a check_b ...

Every check runs on every process (they are collective). The oracle is the same computation
without a mesh, on this process's first device alone (the single-process answer); checks also
record digests of what they returned, and the test asserts both processes agree. Writes
OUT_DIR/process_<i>.json: {check: "ok" | traceback, "digests": {check: sha256}}.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # worker_common, whatever the cwd

from capjax import distributed

distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from capjax import sharding  # noqa: E402
from capjax.attribution import head_ablation_losses, score_heads  # noqa: E402
from capjax.config import ModelConfig  # noqa: E402
from capjax.model import Decoder, param_shapes  # noqa: E402
from capjax.pruning import prune  # noqa: E402
from worker_common import make_batch, run_checks  # noqa: E402

L, E, F, H, K, D, V = 2, 32, 48, 4, 2, 8, 101
CONFIG = ModelConfig("qwen2", V, E, F, L, H, K, D, qkv_bias=True, max_position_embeddings=64)
MODEL = Decoder(CONFIG)
MESHES = {"data2_model2": {"data": 2, "model": 2}, "data4": {"data": -1}}
B, T = 6, 12
DIGESTS: dict[str, str] = {}


def _params():
    """Random host params (numpy, the same on every process): kernels N(0, 0.02); non-trivial
    biases and norms, so that a wrongly sharded leaf would change the numbers."""
    rng = np.random.default_rng(0)

    def leaf(path, s):
        name = sharding._path_name(path)
        if name.endswith("scale"):
            return (1 + rng.normal(0, 0.3, s.shape)).astype(np.float32)
        return rng.normal(0, 0.3 if name.endswith("bias") else 0.02, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(CONFIG))


PARAMS = _params()
TOKENS, AM, LOSS, MASKS = make_batch(V, L, H, n_masks=6, batch=B, time=T)  # N = 6: padding needed on 4 devices


def mesh(name):
    return sharding.make_mesh(MESHES[name])


def digest(name, *arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    DIGESTS[name] = h.hexdigest()


def check_devices():
    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    m = mesh("data4")
    x = jax.device_put(np.arange(8.0), sharding.batch_sharding(m, (8,)))
    assert not x.is_fully_addressable
    assert float(jax.jit(jnp.sum)(x)) == 28.0
    np.testing.assert_array_equal(distributed.to_host(x), np.arange(8.0))
    rows = distributed.process_rows(5)
    got = distributed.gather_rows(np.arange(5)[rows] * 10, 5)
    np.testing.assert_array_equal(got, np.arange(5) * 10)


def check_head_ablation_losses(cases=(("data2_model2", 3), ("data4", 1))):
    ref = head_ablation_losses(MODEL, PARAMS, TOKENS, LOSS, MASKS, AM, chunk_size=3)
    for name, chunk in cases:
        got = head_ablation_losses(MODEL, PARAMS, TOKENS, LOSS, MASKS, AM, chunk_size=chunk, mesh=mesh(name))
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=name)
        digest(f"head_ablation_losses/{name}", got)


def check_smoke():
    """The default suite's: devices and helpers, then ablation losses on one mesh whose "data"
    axis spans both processes."""
    check_devices()
    check_head_ablation_losses(cases=(("data2_model2", 3),))


def check_score_heads():
    for method in ("ablation", "gradient"):
        ref = score_heads(MODEL, PARAMS, TOKENS, LOSS, subsets=3, method=method, attention_mask=AM, progress=False)
        for name in MESHES:
            got = score_heads(
                MODEL,
                PARAMS,
                TOKENS,
                LOSS,
                subsets=3,
                method=method,
                attention_mask=AM,
                chunk_size=1,
                progress=False,
                mesh=mesh(name),
            )
            for f in ("delta", "masked", "baseline"):
                np.testing.assert_allclose(getattr(got, f), getattr(ref, f), atol=1e-5, err_msg=f"{method} {name} {f}")
            digest(f"score_heads/{method}/{name}", got.delta, got.masked, got.baseline)


def check_prune():
    scores = score_heads(MODEL, PARAMS, TOKENS, LOSS, subsets=3, attention_mask=AM, progress=False)
    calib = {"tokens": TOKENS, "attention_mask": AM}
    cases = [
        ("cap", dict(head_scores=scores)),
        ("wanda", dict(calib=calib, batch_size=2)),
        ("sparsegpt", dict(calib=calib, batch_size=2)),
    ]
    for method, kw in cases:
        ref_p, ref_m = prune(MODEL, PARAMS, method, 0.5, **kw)
        for name in MESHES:
            got_p, got_m = prune(MODEL, PARAMS, method, 0.5, mesh=mesh(name), **kw)
            gm, rm = distributed.to_host(got_m), jax.device_get(ref_m)
            for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(rm)):
                np.testing.assert_array_equal(a, b, err_msg=f"{method} {name} mask")
            gp = distributed.to_host(got_p)
            for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(jax.device_get(ref_p))):
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{method} {name} params")
            digest(f"prune/{method}/{name}", *jax.tree.leaves(gm))


def check_evaluation():
    """Perplexity, log-likelihoods and greedy generation on globally sharded params (the batch
    split over "data", i.e. across processes) against the same calls on host params. Batch sizes
    1 and 3 (and the partial last batches) are not divisible by "data": they are padded with
    masked rows and still split, and the metrics equal the single-process ones to 1e-6."""
    from capjax.evaluate.generate import generate
    from capjax.evaluate.perplexity import continuation_logprobs, perplexity

    stream = np.random.default_rng(2).integers(0, V, 8 * 16).astype(np.int32)
    requests = [(TOKENS[i, :4].tolist(), TOKENS[i, 4 : 4 + 1 + i % 5].tolist()) for i in range(B)]
    prompts = [TOKENS[i, : 3 + i % 4].tolist() for i in range(B)]
    sizes = (1, 3, 4)
    ref_ppl = {b: perplexity(MODEL, PARAMS, stream, seq_len=16, batch_size=b) for b in sizes}
    ref_ll = continuation_logprobs(MODEL, PARAMS, requests, batch_size=4)
    ref_gen = generate(MODEL, PARAMS, prompts, max_new_tokens=5, batch_size=4, eos_ids=())
    for name in MESHES:
        p = sharding.shard_params(PARAMS, mesh(name))
        d = sharding.axis_size(mesh(name), "data")
        for n in (1, 3, 4):  # each process holds its rows only, the padding included
            (rows,) = distributed.place_batch(p, np.zeros((n, 16), np.int32))
            assert rows.shape[0] == -(-n // d) * d and not rows.is_fully_addressable, (name, n, rows.shape)
            assert rows.sharding.spec == jax.sharding.PartitionSpec("data"), rows.sharding
        for b in sizes:
            ppl = perplexity(MODEL, p, stream, seq_len=16, batch_size=b)
            np.testing.assert_allclose(ppl["window_nll"], ref_ppl[b]["window_nll"], rtol=1e-6, err_msg=f"{name} {b}")
            assert abs(ppl["ppl"] - ref_ppl[b]["ppl"]) <= 1e-6 * ref_ppl[b]["ppl"], (name, b, ppl, ref_ppl[b])
        for b in (3, 4):
            ll = continuation_logprobs(MODEL, p, requests, batch_size=b)
            np.testing.assert_allclose(
                [x[0] for x in ll], [x[0] for x in ref_ll], rtol=1e-6, atol=1e-6, err_msg=f"{name} {b}"
            )
            assert [x[1:] for x in ll] == [x[1:] for x in ref_ll], name
            gen = generate(MODEL, p, prompts, max_new_tokens=5, batch_size=b, eos_ids=())
            assert gen == ref_gen, (name, b, gen, ref_gen)
        digest(f"evaluation/{name}", np.float64(ppl["ppl"]), np.asarray([x[0] for x in ll]), np.asarray(sum(gen, [])))


def check_checkpoints():
    """Orbax checkpoints written by all processes together: score_heads' layer groups (a rerun
    resumes from them without scoring again) and the pipeline's masks (restored equal)."""
    from capjax import attribution
    from capjax.experiment.runner import pack_masks, unpack_masks
    from capjax.experiment.store import Store

    root = os.path.join(OUT_DIR, "ckpt")
    m = mesh("data4")
    ref = score_heads(MODEL, PARAMS, TOKENS, LOSS, subsets=3, attention_mask=AM, progress=False)
    got = score_heads(
        MODEL,
        PARAMS,
        TOKENS,
        LOSS,
        subsets=3,
        attention_mask=AM,
        chunk_size=1,
        progress=False,
        mesh=m,
        checkpoint_dir=root,
        layers_per_call=1,
    )
    np.testing.assert_allclose(got.delta, ref.delta, atol=1e-5)
    distributed.barrier("scores written")
    groups = sorted(p for d in os.listdir(root) for p in os.listdir(os.path.join(root, d)))
    assert groups == ["layers_0000", "layers_0001"], groups  # each stamped with the code inside (step metadata)
    real = attribution._single_head_nll
    attribution._single_head_nll = None  # a resumed run must not score anything again
    try:
        again = score_heads(
            MODEL,
            PARAMS,
            TOKENS,
            LOSS,
            subsets=3,
            attention_mask=AM,
            chunk_size=1,
            progress=False,
            mesh=m,
            checkpoint_dir=root,
            layers_per_call=1,
        )
        # the fingerprint does not depend on the layout: one device alone resumes from them too
        local = score_heads(
            MODEL,
            PARAMS,
            TOKENS,
            LOSS,
            subsets=3,
            attention_mask=AM,
            chunk_size=1,
            progress=False,
            checkpoint_dir=root,
            layers_per_call=1,
        )
    finally:
        attribution._single_head_nll = real
    np.testing.assert_array_equal(again.masked, got.masked)
    np.testing.assert_array_equal(local.masked, got.masked)

    _, masks = prune(MODEL, PARAMS, "cap", 0.5, head_scores=ref, mesh=m)
    store = Store(Path(OUT_DIR), writer=distributed.is_writer())  # the runner's masks artifact
    arrays, meta = pack_masks(masks)  # gathered from every process
    store.save_npz("masks", "cap", arrays, meta)
    distributed.barrier("masks written")
    restored, _ = unpack_masks(store.load_npz("masks", "cap"), PARAMS)
    restored = [x for x in jax.tree.leaves(restored) if x is not None]
    for a, b in zip(jax.tree.leaves(distributed.to_host(masks)), restored):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    digest("checkpoints", got.delta, *restored)


OUT_DIR = sys.argv[1] if len(sys.argv) > 1 else "."


def main() -> None:
    out_dir = OUT_DIR
    checks = {k: v for k, v in globals().items() if k.startswith("check_")}
    wanted = sys.argv[2:] or list(checks)
    out: dict = run_checks(checks, wanted, prefix=f"[{jax.process_index()}] ")
    out["digests"] = DIGESTS
    with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
