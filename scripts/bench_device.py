"""Accelerator benchmark: CAP head scoring and 2:4 pruning at Llama-3-8B shapes, bfloat16.

    python scripts/bench_device.py [--small] [--full] [--sample-layers 2] [--mesh data=-1,model=1]
                                   [--batch 128] [--seq-len 256] [--subsets 3] [--skip-prune]

A randomly initialised model with Llama-3-8B's shapes (L 32, H 32, K 8, E 4096, F 14336,
V 128256), created directly in bfloat16 and sharded over all local accelerators
(`capjax.sharding`), scored on B x T random tokens (the last quarter of each sequence are the
answer tokens, K subsets). Prints, as they come: the intact loss time, the time to score
every head, ablation-tokens/s and model FLOP utilisation against the chip's peak bf16 dense
TFLOP/s (a table by device_kind, else a measured bf16 matmul peak); then the time of 2:4 pruning
with Wanda and with CAP.

By default only the ablations of the first `--sample-layers` layers are run (the most
expensive ones with prefix reuse) and the time for all L * H heads is extrapolated by FLOPs, which
keeps the run under ~8 minutes on one H200; `--full` runs `score_heads` on every head instead.
`--small` runs the same code on a tiny config (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from capjax import sharding
from capjax.ablation import prepare_batch
from capjax.attribution import default_chunk_size, intact_nll, scoring_flops, single_head_nll
from capjax.config import ModelConfig
from capjax.memory import run_with_oom_fallback
from capjax.model import Decoder
from capjax.pruning import prune

LLAMA3_8B = ModelConfig(
    "llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
SMALL = ModelConfig(
    "llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)

# Peak dense bfloat16 TFLOP/s per chip (vendor figures, without sparsity), matched in order
# against the lower-cased device_kind.
PEAK_TFLOPS = (
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("tpu v4", 275.0),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_tflops(device, n: int) -> tuple[float, str]:
    """(peak bf16 TFLOP/s per chip, where it came from)."""
    kind = device.device_kind.lower()
    for key, tf in PEAK_TFLOPS:
        if key in kind:
            return tf, f"table ({device.device_kind})"
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12, f"measured {n}x{n} bf16 matmul ({device.device_kind})"


def memory_note(device) -> str:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return "memory stats: n/a"
    gb = {k: stats.get(k, 0) / 1e9 for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}
    return (
        f"memory: in use {gb['bytes_in_use']:.1f} GB, peak {gb['peak_bytes_in_use']:.1f} GB, "
        f"limit {gb['bytes_limit']:.1f} GB"
    )


def parse_mesh(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in text.split(",") if part)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny config, for a CPU smoke test")
    p.add_argument("--full", action="store_true", help="score every head (no extrapolation)")
    p.add_argument("--sample-layers", type=int, default=2)
    p.add_argument("--mesh", default="data=-1", help="e.g. data=-1 or data=4,model=2")
    p.add_argument("--batch", type=int, default=None, help="calibration sequences (default 128; --small 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; --small 32)")
    p.add_argument("--subsets", type=int, default=3)
    p.add_argument("--chunk", type=int, default=None, help="ablations per device per step (default: from memory)")
    p.add_argument("--skip-prune", action="store_true")
    a = p.parse_args()

    c = SMALL if a.small else LLAMA3_8B
    B = a.batch or (8 if a.small else 128)
    T = a.seq_len or (32 if a.small else 256)
    L, H = c.num_layers, c.num_heads
    devices = jax.devices()
    mesh = sharding.make_mesh(parse_mesh(a.mesh))
    peak, source = peak_tflops(devices[0], 1024 if a.small else 8192)
    n_dev = mesh.devices.size
    log(
        f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}; "
        f"peak {peak:.1f} TFLOP/s per chip ({source})"
    )
    log(
        f"model: {'small' if a.small else 'Llama-3-8B shapes'} L={L} H={H} K={c.num_kv_heads} E={c.hidden_size} "
        f"F={c.intermediate_size} V={c.vocab_size}, {c.num_params() / 1e6:,.1f} M params, bf16; "
        f"calibration {B} x {T}, K={a.subsets}"
    )

    t = time.perf_counter()
    params = sharding.init_params_sharded(c, mesh, jnp.bfloat16)
    jax.block_until_ready(params)
    log(f"init (jitted, sharded, bf16): {time.perf_counter() - t:.1f} s; {memory_note(devices[0])}")
    model = Decoder(c, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c.vocab_size, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - T // 4 :] = 1
    am = np.ones((B, T), np.int32)
    prep = prepare_batch(model, tokens, loss_mask, am)  # every row is full: packing keeps B x T
    rows, ans_j = prep.rows, prep.packed_ans
    A = len(ans_j[1])

    t = time.perf_counter()
    base = np.asarray(intact_nll(model, params, rows, ans_j, B))
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    np.asarray(intact_nll(model, params, rows, ans_j, B))
    t2 = time.perf_counter() - t
    log(f"intact loss {base.sum() / A:.4f}: {t1:.1f} s with compile, {t2:.2f} s without")

    per_device = -(-H // sharding.axis_size(mesh, sharding.DATA))
    chunk = min(a.chunk or default_chunk_size(c, B, T, jnp.bfloat16, answer_tokens=A), per_device)
    total_flops = scoring_flops(c, B, T, A, baseline=False)
    log(f"scoring {L * H} heads: chunk {chunk} ablations per device per step; {total_flops:.3g} FLOP with prefix reuse")

    scores = None
    if a.full or a.small:
        from capjax.attribution import score_heads

        t = time.perf_counter()
        scores = score_heads(
            model,
            params,
            tokens,
            loss_mask,
            subsets=a.subsets,
            attention_mask=am,
            chunk_size=chunk,
            progress=True,
            mesh=mesh,
        )
        wall = time.perf_counter() - t
        report("all heads, score_heads (with compile)", wall, total_flops, L * H * B * T, peak, n_dev)
    if not a.full:
        n = max(1, min(a.sample_layers, L))
        layers = range(0, n)
        sample_flops = scoring_flops(c, B, T, A, layers, baseline=False)
        state = {}

        def run(ch):
            state["chunk"] = ch
            f = single_head_nll.lower(model, params, rows, ans_j, B, 0, n, ch, mesh=mesh).compile()
            t0 = time.perf_counter()
            out = np.asarray(f(params, rows, ans_j, 0))
            return out, time.perf_counter() - t0

        t = time.perf_counter()
        _, dt = run_with_oom_fallback(run, chunk)
        log(
            f"layers 0..{n - 1} ({n * H} heads, chunk {state['chunk']}): compile {time.perf_counter() - t - dt:.1f} s, "
            f"run {dt:.1f} s"
        )
        report(f"layers 0..{n - 1}, measured", dt, sample_flops, n * H * B * T, peak, n_dev)
        est = dt * total_flops / sample_flops
        report(f"all {L * H} heads, extrapolated by FLOPs", est, total_flops, L * H * B * T, peak, n_dev)
    log(memory_note(devices[0]))

    if a.skip_prune:
        return
    calib = {"tokens": tokens, "attention_mask": am}
    delta = scores.delta if scores is not None else rng.normal(size=(L, H))  # timing does not depend on it
    for method, kw in (("wanda", dict(calib=calib)), ("cap", dict(head_scores=delta))):
        t = time.perf_counter()
        pruned, masks = prune(model, params, method, 0.5, nm="2:4", mesh=mesh, **kw)
        jax.block_until_ready((pruned, masks))
        log(f"prune {method} 2:4: {time.perf_counter() - t:.1f} s (with compile); {memory_note(devices[0])}")
        del pruned, masks


def report(what: str, seconds: float, flops: float, ablation_tokens: float, peak: float, n_dev: int) -> None:
    mfu = flops / seconds / (peak * 1e12 * n_dev)
    log(
        f"{what}: {seconds:.1f} s, {ablation_tokens / seconds:,.0f} ablation-tokens/s, "
        f"{flops / seconds / 1e12:.1f} TFLOP/s, MFU {100 * mfu:.1f}%"
    )


if __name__ == "__main__":
    main()
