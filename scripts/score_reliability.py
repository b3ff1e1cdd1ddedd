"""Split-half rank reliability of CAP's estimators, and how well the gradient preview ranks heads.

    python scripts/score_reliability.py [--n 6] [--seq-len 128] [--subsets 3] [--task synthetic]

Draws 2n calibration examples, scores the two disjoint halves separately (exact ablation, K
subsets each), and reports the Spearman correlation between the halves' head scores for the
paper's estimator (median_k masked - mean_k baseline) and the paired one (median_k of
masked - baseline). Then the gradient method (one backward pass) against exact ablation on the
same half.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

import capjax
from capjax.attribution import aggregate_scores, score_heads
from capjax.data import build_calibration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="synthetic")
    p.add_argument("--n", type=int, default=6, help="examples per half")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--subsets", type=int, default=3)
    args = p.parse_args()
    model, params = capjax.load_pretrained(args.model)
    tokenizer = capjax.load_tokenizer(args.model)
    calib = build_calibration(args.task, tokenizer, n=2 * args.n, seq_len=args.seq_len, seed=0)
    halves = [calib.subset(np.arange(args.n)), calib.subset(np.arange(args.n, 2 * args.n))]
    exact = []
    for i, half in enumerate(halves):
        t0 = time.perf_counter()
        exact.append(
            score_heads(model, params, half.tokens, half.loss_mask, args.subsets, attention_mask=half.attention_mask)
        )
        print(f"half {i}: exact scores in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{args.model}, {args.task}, halves of N={args.n}, T={args.seq_len}, K={args.subsets}")
    for agg in ("median", "mean", "paired"):
        a, b = (aggregate_scores(s.masked, s.baseline, agg).ravel() for s in exact)
        print(f"split-half Spearman, {agg:>6}: {spearmanr(a, b).statistic:.3f}")
    t0 = time.perf_counter()
    grad = score_heads(
        model,
        params,
        halves[0].tokens,
        halves[0].loss_mask,
        args.subsets,
        method="gradient",
        attention_mask=halves[0].attention_mask,
    )
    print(
        f"gradient scores in {time.perf_counter() - t0:.1f} s; Spearman with exact ablation (same half, median): "
        f"{spearmanr(grad.delta.ravel(), exact[0].delta.ravel()).statistic:.3f}"
    )


if __name__ == "__main__":
    main()
