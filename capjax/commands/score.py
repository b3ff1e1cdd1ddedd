"""`capjax score`: CAP head scores of a model on a calibration set, written as .npz."""

from __future__ import annotations

import argparse
import time

from capjax import estimators
from capjax.commands.common import (
    add_calibration_args,
    add_model_args,
    check_calibration_data,
    load_calibration,
    load_model,
    non_negative_int,
    output_file,
    positive_int,
)
from capjax.experiment.config import SCORING_METHODS, CalibrationConfig, ablation_kind_names, score_metric_names
from capjax.provenance import code_version
from capjax.stats import MIN_RESAMPLES

_CALIB = CalibrationConfig()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score every attention head (exact ablation or gradient)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--subsets", type=positive_int, default=_CALIB.subsets, help="U disjoint calibration subsets")
    p.add_argument(
        "--aggregate",
        default=_CALIB.aggregate,
        choices=estimators.names(),
        help="a registered estimator (capjax.estimators); gradient scores take median, mean or paired",
    )
    p.add_argument("--method", default=_CALIB.method, choices=SCORING_METHODS)
    p.add_argument(
        "--kind",
        default=_CALIB.kind,
        choices=ablation_kind_names(),
        help="what replaces an ablated head's output (zero: CAP; or a registered kind, capjax.ablation.register_kind)",
    )
    p.add_argument(
        "--metric",
        default=_CALIB.metric,
        choices=score_metric_names(),
        help="what is measured at the answer tokens (ce: CAP's loss; kl: KL from the intact model; "
        "or a registered metric, capjax.ablation.register_metric)",
    )
    p.add_argument(
        "--chunk-size", type=positive_int, default=None, help="ablations evaluated at once (default: from memory)"
    )
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=_CALIB.bootstrap,
        help="bootstrap resamples for each head's 95%% interval (exact ablation; 0: none)",
    )
    p.add_argument("--checkpoint-dir", default=None, help="save finished layer groups here; a rerun resumes")
    p.add_argument("--plot", default=None, help="also write a head-score heatmap (png)")
    p.add_argument("--out", required=True, help="scores .npz (delta [L,H], masked [U,L,H], baseline [U])")
    p.set_defaults(func=run)


def run(args) -> int:
    # Where the result goes and what it needs are checked before the model loads.
    out = output_file(args.out, ".npz")
    plot = output_file(args.plot, ".png") if args.plot else None
    if args.subsets > args.n:
        raise ValueError(f"--subsets {args.subsets} exceeds --n {args.n}")
    check_calibration_data(args.calib, args.data_dir)

    from capjax.attribution import check_method_metric, score_heads

    check_method_metric(args.method, args.metric)

    model, params, tokenizer = load_model(args)
    calib = load_calibration(args, tokenizer)
    t0 = time.perf_counter()
    scores = score_heads(
        model,
        params,
        calib.tokens,
        calib.loss_mask,
        subsets=args.subsets,
        aggregate=args.aggregate,
        method=args.method,
        attention_mask=calib.attention_mask,
        chunk_size=args.chunk_size,
        checkpoint_dir=args.checkpoint_dir,
        bootstrap=args.bootstrap if args.method == "ablation" else 0,
        kind=args.kind,
        metric=args.metric,
    )
    seconds = time.perf_counter() - t0
    from capjax.identity import model_identity

    out = scores.save(
        out,
        model=str(args.model),
        model_id=model_identity(args.model),
        calib=args.calib,
        n=args.n,
        seq_len=args.seq_len,
        seed=args.seed,
        subsets=args.subsets,
        n_truncated=int(calib.n_truncated),
        seconds=seconds,
        code=code_version(),
    )
    L, H = scores.delta.shape
    print(
        f"scored {L * H} heads in {seconds:.1f} s; baseline loss per subset "
        f"{', '.join(f'{b:.4f}' for b in scores.baseline)}; wrote {out}"
    )
    if scores.interval is not None:
        distinct = int(((scores.interval[0] > 0) | (scores.interval[1] < 0)).sum())
        print(f"{distinct} of {L * H} heads have a 95% bootstrap interval that excludes zero")
    elif args.method == "ablation" and args.bootstrap:
        print(
            f"no test of the heads against zero: --bootstrap {args.bootstrap} is below the {MIN_RESAMPLES} "
            "resamples a 95% interval needs"
        )
    if plot:
        from capjax.report import plot_head_scores

        plot_head_scores(
            scores.delta, plot, title=f"CAP head scores ({args.calib}, {scores.describe()})", interval=scores.interval
        )
        print(f"heatmap: {plot}")
    return 0
