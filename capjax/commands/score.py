"""`capjax score`: CAP head scores of a model on a calibration set, written as .npz."""

from __future__ import annotations

import argparse
import time

from capjax.commands.common import add_calibration_args, add_model_args, load_calibration, load_model


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score every attention head (exact ablation or gradient)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--subsets", type=int, default=3, help="U disjoint calibration subsets")
    p.add_argument("--aggregate", default="median", choices=["median", "mean", "paired"])
    p.add_argument("--method", default="ablation", choices=["ablation", "gradient"])
    p.add_argument("--chunk-size", type=int, default=None, help="ablations evaluated at once (default: from memory)")
    p.add_argument("--checkpoint-dir", default=None, help="save finished layer groups here; a rerun resumes")
    p.add_argument("--plot", default=None, help="also write a head-score heatmap (png)")
    p.add_argument("--out", required=True, help="scores .npz (delta [L,H], masked [U,L,H], baseline [U])")
    p.set_defaults(func=run)


def run(args) -> int:
    from capjax.attribution import score_heads

    model, params, tokenizer = load_model(args)
    calib = load_calibration(args, tokenizer)
    t0 = time.perf_counter()
    scores = score_heads(model, params, calib.tokens, calib.loss_mask, subsets=args.subsets,
                         aggregate=args.aggregate, method=args.method, attention_mask=calib.attention_mask,
                         chunk_size=args.chunk_size, checkpoint_dir=args.checkpoint_dir)
    seconds = time.perf_counter() - t0
    scores.save(args.out, model=str(args.model), calib=args.calib, n=args.n, seq_len=args.seq_len,
                seed=args.seed, subsets=args.subsets, n_truncated=int(calib.n_truncated), seconds=seconds)
    L, H = scores.delta.shape
    print(f"scored {L * H} heads in {seconds:.1f} s; baseline loss per subset "
          f"{', '.join(f'{b:.4f}' for b in scores.baseline)}; wrote {args.out}")
    if args.plot:
        from capjax.report import plot_head_scores

        plot_head_scores(scores.delta, args.plot, title=f"CAP head scores ({args.calib}, {args.aggregate})")
        print(f"heatmap: {args.plot}")
    return 0
