"""How many ablations to vmap at once: exact scoring of the first layers' heads at several chunk sizes.

    python scripts/bench_chunk.py [--task gsm8k] [--n 12] [--seq-len 128] [--plain] [--layers 2] [--chunks 1 2 3 9]

Runs the compiled scoring function (`capjax.attribution.single_head_nll`) on the ablations of
layers 0..layers-1 of SmolLM2-135M-Instruct, each chunk size side by side on the same tokens,
compile excluded, and prints each time relative to chunk = H (all of a layer's heads at once) and
the chunk `capjax.memory.chunk_size_for_memory` picks here, with the activation bytes per
ablation. The results must not depend on the chunk: it prints the largest relative difference.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import capjax
from capjax.ablation import prepare_batch
from capjax.attribution import default_chunk_size, single_head_nll
from capjax.data import build_calibration
from capjax.memory import CPU_CHUNK_BYTES, ablation_bytes
from capjax.model import VOCAB_CHUNK


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="gsm8k", help="calibration set (gsm8k needs --data-dir/CAPJAX_DATA)")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--plain", action="store_true", help="'Question: ... Answer:' instead of the chat template")
    p.add_argument("--layers", type=int, default=2, help="score the heads of this many layers (from layer 0)")
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3, 9])
    args = p.parse_args()

    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tokenizer = capjax.load_tokenizer("smollm2-135m-instruct")
    calib = build_calibration(
        args.task, tokenizer, n=args.n, seq_len=args.seq_len, seed=0, chat=False if args.plain else None
    )
    prep = prepare_batch(model, calib.tokens, calib.loss_mask, calib.attention_mask)
    c, A = model.config, len(prep.packed_ans[1])
    default = default_chunk_size(c, *prep.shape, model.dtype, answer_tokens=A)
    per = ablation_bytes(c, *prep.shape, model.dtype, A, vocab_chunk=VOCAB_CHUNK)
    print(
        f"SmolLM2-135M-Instruct, {args.task} N={args.n} T={args.seq_len}: layout {prep.shape} (rows, keys), "
        f"{per / 2**20:.1f} MiB of activations per ablation; default chunk here {min(default, c.num_heads)} "
        f"(CPU cap {CPU_CHUNK_BYTES >> 20} MiB); jax {jax.__version__} on {jax.devices()[0].platform}"
    )

    times, results = {}, {}
    for chunk in sorted(set(args.chunks + [c.num_heads])):

        def run(chunk=chunk):
            return np.asarray(
                single_head_nll(
                    model, params, prep.rows, prep.packed_ans, prep.packed.num_examples, 0, args.layers, chunk
                )
            )

        run()
        t = time.perf_counter()
        results[chunk] = run()
        times[chunk] = time.perf_counter() - t
    ref = times[c.num_heads]
    for chunk, t in times.items():
        diff = np.abs(results[chunk] / results[c.num_heads] - 1).max()
        print(
            f"chunk {chunk:3d}: {t:7.1f} s  ({ref / t:.2f}x vs chunk {c.num_heads}; per-example NLL sums "
            f"equal to {diff:.1e} relative)"
        )


if __name__ == "__main__":
    main()
