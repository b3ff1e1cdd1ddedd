"""A custom ablation study with `head_ablation_losses`: head pairs within a layer, and whole layers.

    python scripts/ablation_study.py [--layer 3] [--n 6] [--seq-len 128] [--model smollm2-135m-instruct]

One jitted call scores all masks of a study. Pair interactions tell which heads are redundant
(ablating both costs less than the sum: interaction < 0) or synergistic (> 0):

    interaction(i, j) = L(i, j ablated) - L(i) - L(j) + L(intact)
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

import capjax
from capjax.data import build_calibration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()

    model, params = capjax.load_pretrained(args.model)
    tokenizer = capjax.load_tokenizer(args.model)
    calib = build_calibration("synthetic", tokenizer, n=args.n, seq_len=args.seq_len, seed=0)
    L, H = model.config.num_layers, model.config.num_heads
    l = args.layer

    # Study 1: intact, every single head of layer l, every pair of heads of layer l.
    pairs = list(itertools.combinations(range(H), 2))
    masks = np.ones((1 + H + len(pairs), L, H), np.float32)
    for h in range(H):
        masks[1 + h, l, h] = 0
    for k, (i, j) in enumerate(pairs):
        masks[1 + H + k, l, [i, j]] = 0
    t0 = time.perf_counter()
    losses = capjax.head_ablation_losses(model, params, calib.tokens, calib.loss_mask, masks, calib.attention_mask)
    print(f"layer {l}: {len(masks)} ablations in {time.perf_counter() - t0:.1f} s (one compiled call)")
    base, single = losses[0], losses[1:1 + H]
    inter = np.zeros((H, H))
    for k, (i, j) in enumerate(pairs):
        inter[i, j] = inter[j, i] = losses[1 + H + k] - single[i] - single[j] + base
    print(f"intact loss {base:.4f}; single-head deltas: " + " ".join(f"{d:+.4f}" for d in single - base))
    print("pair interactions (rows/cols = heads):")
    print("      " + " ".join(f"{j:>7d}" for j in range(H)))
    for i in range(H):
        print(f"{i:>5d} " + " ".join("      ." if i == j else f"{inter[i, j]:+7.4f}" for j in range(H)))
    order = sorted(pairs, key=lambda ij: inter[ij])
    print("most redundant pair:", order[0], f"{inter[order[0]]:+.4f}; most synergistic pair:", order[-1],
          f"{inter[order[-1]]:+.4f}")

    # Study 2: every whole layer's attention removed.
    layer_masks = np.ones((L, L, H), np.float32)
    for k in range(L):
        layer_masks[k, k] = 0
    deltas = capjax.head_ablation_losses(model, params, calib.tokens, calib.loss_mask, layer_masks,
                                         calib.attention_mask) - base
    print("whole-layer attention ablation, loss increase per layer:")
    print(" ".join(f"{k}:{d:+.3f}" for k, d in enumerate(deltas)))
    print("layers whose attention matters most:", np.argsort(-deltas)[:5].tolist())


if __name__ == "__main__":
    main()
