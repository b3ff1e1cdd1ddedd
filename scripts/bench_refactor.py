"""Scoring and evaluation speed of whichever capjax is on PYTHONPATH, for side-by-side runs
(e.g. before and after a refactor) on SmolLM2-135M-Instruct, float32, no torch.

    PYTHONPATH=/path/to/old python scripts/bench_refactor.py [--n 6] [--seq-len 128] [--reps 2]
    PYTHONPATH=/path/to/new python scripts/bench_refactor.py ...

Prints the best of `reps` warm (compiled) wall times of: exact head scoring (score_heads, all
L * H heads), a full-logits forward over the calibration batch (evaluation's path), and greedy
generation of 16 tokens for 4 prompts (the KV-cache path), plus a checksum of the scores.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import capjax
from capjax.attribution import score_heads
from capjax.data import build_calibration
from capjax.evaluate import generate


def best(f, reps):
    f()  # compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    calib = build_calibration("synthetic", tok, n=args.n, seq_len=args.seq_len, seed=0)
    out = {}

    def score():
        out["s"] = score_heads(model, params, calib.tokens, calib.loss_mask, 2,
                               attention_mask=calib.attention_mask, progress=False)
    fwd = jax.jit(model.apply)

    def forward():
        fwd({"params": params}, calib.tokens, attention_mask=calib.attention_mask).block_until_ready()
    prompts = [list(r[m > 0][:24]) for r, m in zip(calib.tokens[:4], calib.attention_mask[:4])]

    def gen():
        generate(model, params, prompts, 16, batch_size=4, eos_ids=[])
    print(f"capjax from {capjax.__file__}")
    print(f"score_heads  N={args.n} T={args.seq_len}: {best(score, args.reps):7.2f} s "
          f"(delta checksum {np.abs(out['s'].delta).sum():.6f})")
    print(f"forward      [{args.n}, {args.seq_len}]:       {best(forward, args.reps):7.3f} s")
    print(f"generate     4 x 16 tokens:     {best(gen, args.reps):7.3f} s")


if __name__ == "__main__":
    main()
