"""Exact head scoring with and without sequence packing, side by side on the same calibration set.

    python scripts/bench_packing.py [--calib arc_challenge] [--n 6] [--seq-len 256] [--subsets 3]

Real calibration sets have examples of different lengths, so a padded [N, T] batch is partly
padding. score_heads(pack=True) (the default) packs the examples into rows (capjax.packing);
pack=False keeps one example per row, cut after the batch's last answer token. Both run with
share_prefix=False, so that packing alone is measured (bench_scoring.py measures prefix sharing).
Prints the layouts, both wall times (compile included), their ratio and the largest score
difference.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from capjax.attribution import score_heads
from capjax.commands.common import add_calibration_args, add_model_args, load_calibration, load_model
from capjax.packing import pack_examples


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--subsets", type=int, default=3)
    p.set_defaults(calib="arc_challenge", n=6)
    args = p.parse_args()

    model, params, tokenizer = load_model(args)
    calib = load_calibration(args, tokenizer)
    packed = pack_examples(calib.tokens, calib.loss_mask, calib.attention_mask, share_prefix=False)
    c = model.config
    print(
        f"{args.model}: {c.num_layers * c.num_heads} heads; calibration {args.calib} N={args.n} T={args.seq_len} "
        f"K={args.subsets}; jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(
        f"padded batch {calib.tokens.shape[0]} x {calib.tokens.shape[1]} ({calib.attention_mask.mean():.0%} real "
        f"tokens); packed {packed.tokens.shape[0]} x {packed.tokens.shape[1]} "
        f"({(packed.segment_ids > 0).mean():.0%} real)"
    )

    times, scores = {}, {}
    for pack in (False, True):
        t = time.perf_counter()
        scores[pack] = score_heads(
            model,
            params,
            calib.tokens,
            calib.loss_mask,
            args.subsets,
            attention_mask=calib.attention_mask,
            progress=False,
            pack=pack,
            share_prefix=False,
        )
        times[pack] = time.perf_counter() - t
    print(f"one example per row: {times[False]:8.1f} s")
    print(f"packed             : {times[True]:8.1f} s")
    print(f"speed-up           : {times[False] / times[True]:8.2f}x (compile included in both)")
    print(f"max |delta diff|   : {np.abs(scores[True].delta - scores[False].delta).max():.2e}")
    print(f"max |masked diff|  : {np.abs(scores[True].masked - scores[False].masked).max():.2e}")


if __name__ == "__main__":
    main()
