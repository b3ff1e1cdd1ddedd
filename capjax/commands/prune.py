"""`capjax prune`: prune a model with CAP or a baseline and write an HF folder plus masks.npz."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# capjax.experiment imports no jax, so building the CLI parser stays fast.
from capjax.experiment import CALIB_TASKS
from capjax.pruning import registry


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prune", help="prune a model (CAP, Wanda, SparseGPT, magnitude, random)",
                              description=__doc__)
    p.add_argument("--model", required=True, help="HF folder, .gguf file, hub id or smollm2-135m-instruct")
    p.add_argument("--method", default="cap", choices=registry.names(),
                   help="a registered method (capjax.pruning.registry; plugins via CAPJAX_PLUGINS)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of prunable weights removed (cap_heads: of heads); default 0.2, "
                        "or N/M with --nm")
    p.add_argument("--nm", default=None, help="N:M semi-structured sparsity, e.g. 2:4")
    p.add_argument("--scores", default=None, help="scores.npz with key 'delta' [L, H] (cap methods)")
    p.add_argument("--calib", default=None, choices=CALIB_TASKS, help="calibration task (wanda, sparsegpt, cap_wanda)")
    p.add_argument("--n", type=int, default=128, help="calibration examples")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="calibration sampling (and random pruning) seed")
    p.add_argument("--kv-rule", default=None, choices=("mean", "max"), help="cap / cap_wanda kv head rule")
    p.add_argument("--scope", default=None, help="cap: global | layer; magnitude: matrix | global")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)
    return p


def _load_delta(path: str) -> np.ndarray:
    f = Path(path)
    if not f.exists():
        raise FileNotFoundError(f"scores file not found: {f}")
    with np.load(f) as z:
        if "delta" not in z:
            raise ValueError(f"{f} has no 'delta' array (keys: {', '.join(z.files)})")
        return np.asarray(z["delta"])


def run(args: argparse.Namespace) -> int:
    import capjax
    from capjax.pruning import prune, sparsity_report
    from capjax.pruning.prune import flat_masks

    spec = registry.spec(args.method)
    if spec.needs_scores and args.scores is None:
        raise ValueError(f"--method {args.method} needs --scores scores.npz (key 'delta' [L, H])")
    if spec.needs_calib and args.calib is None:
        raise ValueError(f"--method {args.method} needs --calib ({', '.join(CALIB_TASKS)})")
    options = {}
    if args.kv_rule is not None:
        options["kv_rule"] = args.kv_rule
    if args.scope is not None:
        options["scope"] = args.scope
    if args.method == "random":
        options["seed"] = args.seed
    delta = _load_delta(args.scores) if spec.needs_scores else None

    model, params = capjax.load_pretrained(args.model, dtype=args.dtype)
    try:
        tokenizer = capjax.load_tokenizer(args.model)
    except Exception as e:  # a bare weights folder is fine unless calibration needs text
        if spec.needs_calib:
            raise ValueError(f"--calib needs the model's tokenizer, which failed to load: {e}") from e
        print(f"capjax prune: no tokenizer saved ({type(e).__name__}: {e})", file=sys.stderr)
        tokenizer = None
    calib = None
    if spec.needs_calib:
        from capjax.data import build_calibration

        calib = build_calibration(args.calib, tokenizer, n=args.n, seq_len=args.seq_len, seed=args.seed,
                                  data_dir=args.data_dir)
    sparsity = args.sparsity
    if sparsity is None:
        sparsity = 0.2 if args.nm is None else 0.0  # with N:M the pattern sets the sparsity
    pruned, masks = prune(model, params, args.method, sparsity, head_scores=delta, calib=calib,
                          nm=args.nm, **options)
    out = capjax.save_pretrained(model, pruned, args.out, tokenizer)
    flat = {path: np.asarray(m) for path, m in flat_masks(masks).items()}
    np.savez_compressed(Path(out) / "masks.npz", **flat)
    print(sparsity_report(pruned).table())
    print(f"wrote {out} (masks.npz: {len(flat)} masks)")
    return 0
