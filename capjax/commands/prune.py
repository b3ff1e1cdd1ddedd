"""`capjax prune`: prune a model with CAP or a baseline and write an HF folder plus masks.npz and
capjax_prune.json (how it was made: method, sparsities, options, the scores file's digest or the
calibration, and the capjax code version)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from capjax.artifacts import file_digest, strict_json, write_masks_npz, write_text
from capjax.commands.common import check_calibration_data, non_negative_int, positive_int
from capjax.experiment.config import DTYPES, CalibrationConfig, ConfigError, calibration_task_names, parse_nm_text
from capjax.provenance import code_version
from capjax.pruning import registry

_CALIB = CalibrationConfig()


def add_parser(subparsers) -> argparse.ArgumentParser:
    specs = dict(registry.METHODS.items())  # name -> MethodSpec, read once (plugins loaded)
    p = subparsers.add_parser("prune", help=f"prune a model ({', '.join(specs)})", description=__doc__)
    p.add_argument("--model", required=True, help="HF folder, .gguf file, hub id or smollm2-135m-instruct")
    p.add_argument(
        "--method",
        default="cap",
        choices=tuple(specs),
        help="a registered method (capjax.pruning.registry; plugins via CAPJAX_PLUGINS)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction of prunable weights removed (cap_heads: of heads); default 0.2, or N/M with --nm",
    )
    p.add_argument("--nm", default=None, help="N:M semi-structured sparsity, e.g. 2:4")
    p.add_argument("--scores", default=None, help="scores.npz with key 'delta' [L, H] (cap methods)")
    p.add_argument(
        "--calib",
        default=None,
        choices=calibration_task_names(),
        help=f"calibration task ({', '.join(n for n, s in specs.items() if s.needs_calib)})",
    )
    p.add_argument("--n", type=positive_int, default=_CALIB.n, help="calibration examples")
    p.add_argument("--seq-len", type=positive_int, default=_CALIB.seq_len)
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="calibration sampling (and seeded methods': random) seed"
    )
    p.add_argument(
        "--kv-rule",
        default=None,
        choices=specs["cap"].choices["kv_rule"],
        help=f"kv head rule of {', '.join(n for n, s in specs.items() if 'kv_rule' in s.options)}",
    )
    scopes = [f"{n}: {' | '.join(s.choices.get('scope', ()))}" for n, s in specs.items() if "scope" in s.options]
    p.add_argument("--scope", default=None, help="; ".join(scopes))
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--sparsity-format",
        default=None,
        choices=("compressed-tensors",),
        help="store the pruned matrices compressed (2:4 or bitmask; pip install capjax[compressed]) instead of dense",
    )
    p.add_argument(
        "--hf-masks",
        action="store_true",
        help="also write masks_hf.npz: the masks under HF tensor names, shaped [out, in]",
    )
    s = p.add_argument_group("cap_structured (a smaller model: heads, MLP channels, layers removed)")
    s.add_argument("--heads", type=float, default=0.0, help="fraction of query heads removed per layer")
    s.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP channels removed per layer")
    s.add_argument("--layers", type=int, default=0, help="number of whole layers removed")
    structured = specs["cap_structured"]  # its options' defaults and choices
    s.add_argument(
        "--head-groups",
        default=structured.options["head_groups"],
        choices=structured.choices["head_groups"],
        help="remove query heads within every kv group (query) or whole kv groups (kv)",
    )
    s.add_argument(
        "--mlp-score",
        default=structured.options["mlp_score"],
        choices=structured.choices["mlp_score"],
        help="MLP channel score (docs/structured.md: measured quality per score; ablation: exact ablation of "
        "channel groups, L x F / --mlp-group ablations, each from its layer's intact input)",
    )
    s.add_argument(
        "--mlp-group",
        type=positive_int,
        default=structured.options["mlp_group"],
        help="--mlp-score ablation: channels ablated together (neighbours in activation rank)",
    )
    s.add_argument(
        "--layer-score", default=structured.options["layer_score"], choices=structured.choices["layer_score"]
    )
    p.set_defaults(func=run)
    return p


EXPORT_MARKER = "capjax_prune.json"  # what makes a folder an export that a new one may replace


def _check_out_is_not_model(model: str, out: str) -> None:
    """--out must not be the --model folder, inside it, or hold it: the export replaces --out whole."""
    import os

    src = Path(model).expanduser()
    if not src.exists():
        return  # a hub id or the bundled model: nothing local to overwrite
    src, dst = Path(os.path.realpath(src)), Path(os.path.realpath(Path(out).expanduser()))
    if dst == src or src in dst.parents or dst in src.parents:
        relation = "is" if dst == src else "is inside" if src in dst.parents else "holds"
        raise ValueError(
            f"--out {out} {relation} the --model {model}: the export would overwrite the model "
            "it reads; choose another --out"
        )


def run_structured(args: argparse.Namespace) -> int:
    """cap_structured: prints the chosen shapes, scores, shrinks and writes the smaller HF folder."""
    import capjax
    from capjax.experiment.config import check_writable_dir
    from capjax.experiment.folders import check_replaceable, replaced_folder
    from capjax.identity import model_identity
    from capjax.structured import shrink
    from capjax.structured.method import shape_for, structured_plan

    _check_out_is_not_model(args.model, args.out)
    check_replaceable(args.out, EXPORT_MARKER)  # the export replaces --out whole (old export or new, never a mix)
    check_writable_dir(Path(args.out).parent, "--out's folder")  # before any compute
    config = capjax.load_config(args.model)
    options = {"heads": args.heads, "mlp": args.mlp, "layers": args.layers, "head_groups": args.head_groups}
    explicit = args.heads or args.mlp or args.layers
    if explicit and args.sparsity is not None:
        raise ValueError(
            "--method cap_structured takes --heads/--mlp/--layers or --sparsity (a parameter budget), not both"
        )
    if not explicit and args.sparsity is None:
        raise ValueError(
            "--method cap_structured needs --heads/--mlp/--layers, or --sparsity (the fraction of parameters removed)"
        )
    shape = shape_for(config, args.sparsity, options)
    print(f"cap_structured: {shape.describe(config)}", flush=True)  # before anything is computed or written
    if args.mlp_score == "ablation" and args.mlp_group > config.intermediate_size:
        raise ValueError(
            f"--mlp-group {args.mlp_group}: {args.model} has {config.intermediate_size} MLP channels per layer; "
            f"give at most {config.intermediate_size}"
        )
    delta = None
    if shape.num_heads < config.num_heads:
        if args.scores is None:
            raise ValueError("--method cap_structured removing heads needs --scores scores.npz (key 'delta' [L, H])")
        delta, scored = _load_delta(args.scores)
        _check_scored_model(args.scores, scored, args.model)
        if delta.shape != (config.num_layers, config.num_heads):
            raise ValueError(
                f"{args.scores}: 'delta' is {list(delta.shape)} but {args.model} has "
                f"[{config.num_layers}, {config.num_heads}] heads: score this model with capjax score"
            )
    needs_calib = shape.intermediate_size < config.intermediate_size or shape.num_layers < config.num_layers
    if needs_calib:
        if args.calib is None:
            raise ValueError(
                f"--method cap_structured removing MLP channels or layers needs --calib "
                f"({', '.join(calibration_task_names())})"
            )
        check_calibration_data(args.calib, args.data_dir)
    model, params = capjax.load_pretrained(args.model, dtype=args.dtype)
    tokenizer = capjax.load_tokenizer(args.model)
    calib = None
    if needs_calib:
        calib = capjax.build_calibration(
            args.calib, tokenizer, n=args.n, seq_len=args.seq_len, seed=args.seed, data_dir=args.data_dir
        )
    tokens, loss_mask, am = (
        (calib.tokens, calib.loss_mask, calib.attention_mask) if calib is not None else (None, None, None)
    )
    plan = structured_plan(
        model,
        params,
        shape,
        delta,
        tokens,
        loss_mask,
        am,
        mlp_score=args.mlp_score,
        layer_score=args.layer_score,
        mlp_group=args.mlp_group,
        progress=True,
    )
    small, small_params = shrink(model, params, plan)
    with replaced_folder(args.out, EXPORT_MARKER) as staging:  # written beside --out, then swapped in whole
        capjax.save_pretrained(small, small_params, staging, tokenizer)
        write_text(staging / "structured_plan.json", plan.to_json())
        write_text(
            staging / EXPORT_MARKER,
            strict_json(
                {
                    "model": str(args.model),
                    "method": args.method,
                    "shape": {**options, "sparsity": args.sparsity},
                    "mlp_score": args.mlp_score,
                    **({"mlp_group": args.mlp_group} if args.mlp_score == "ablation" else {}),
                    "layer_score": args.layer_score,
                    "dtype": args.dtype,
                    "parameters": {"dense": config.num_params(), "structured": small.config.num_params()},
                    "scores": {"file": str(args.scores), "digest": file_digest(Path(args.scores))}
                    if delta is not None
                    else None,
                    "calibration": {"task": args.calib, "n": args.n, "seq_len": args.seq_len, "seed": args.seed}
                    if needs_calib
                    else None,
                    "model_id": model_identity(args.model),
                    "code": code_version(),
                }
            ),
        )
    out = Path(args.out)
    print(
        f"wrote {out}: a standard {small.config.model_type} model with {small.config.num_params():,} parameters "
        f"(structured_plan.json: the kept layers, heads and channels)"
    )
    return 0


def _load_delta(path: str) -> tuple[np.ndarray, dict]:
    """(delta [L, H], the settings the scores file records: its model and model_id, ...)."""
    import json

    from capjax.experiment.store import read_npz

    arrays = read_npz(path, required=("delta",))
    delta = np.asarray(arrays["delta"])
    if delta.ndim != 2 or not np.all(np.isfinite(delta)):
        raise ValueError(
            f"{path}: 'delta' must be a finite [L, H] array, got shape {list(delta.shape)}"
            f"{'' if np.all(np.isfinite(delta)) else ' with NaN/Inf'}"
        )
    key = "settings" if "settings" in arrays else "meta" if "meta" in arrays else None
    try:
        settings = json.loads(str(arrays[key])) if key else {}
    except ValueError:
        settings = {}
    return delta, settings if isinstance(settings, dict) else {}


def _check_scored_model(path: str, settings: dict, model: str) -> None:
    """Scores of another model are refused (capjax.identity); a file that records no model is said."""
    from capjax.identity import model_identity

    recorded = settings.get("model_id")
    if recorded is None:
        print(
            f"capjax prune: warning: {path} does not record the model it scored; cannot check it is {model}",
            file=sys.stderr,
        )
        return
    here = model_identity(model)
    if recorded != here:
        raise ValueError(
            f"--scores {path} scored {settings.get('model', 'another model')} (model id {recorded}), "
            f"not --model {model} (model id {here}): score this model with capjax score"
        )


def run(args: argparse.Namespace) -> int:
    import capjax
    from capjax.identity import model_identity
    from capjax.pruning import prune, sparsity_report
    from capjax.pruning.prune import flat_masks, masks_digest

    if args.method == "cap_structured":
        return run_structured(args)
    spec = registry.spec(args.method)
    from capjax.experiment.config import check_writable_dir
    from capjax.experiment.folders import check_replaceable

    _check_out_is_not_model(args.model, args.out)
    check_replaceable(args.out, EXPORT_MARKER)  # the export replaces --out whole (old export or new, never a mix)
    check_writable_dir(Path(args.out).parent, "--out's folder")  # before any compute
    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise ValueError(
            f"--sparsity must be in [0, 1) (the fraction of weights removed; cap_heads: of heads), "
            f"got {args.sparsity:g}"
        )
    try:
        nm = parse_nm_text(args.nm, "--nm")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if nm is not None and args.sparsity is not None:
        n, m = (int(x) for x in nm.split(":"))
        if abs(args.sparsity - n / m) > 1e-9:
            raise ValueError(f"--nm {nm} fixes the sparsity at {n / m:g}; drop --sparsity {args.sparsity:g}")
    if nm is not None:  # the divisibility of the rows needs the config only
        from capjax.pruning.prune import check_nm_fits

        check_nm_fits(capjax.load_config(args.model), nm)
    if spec.needs_scores and args.scores is None:
        raise ValueError(f"--method {args.method} needs --scores scores.npz (key 'delta' [L, H])")
    if spec.needs_calib and args.calib is None:
        raise ValueError(f"--method {args.method} needs --calib ({', '.join(calibration_task_names())})")
    options = {}
    if args.kv_rule is not None:
        options["kv_rule"] = args.kv_rule
    if args.scope is not None:
        options["scope"] = args.scope
    options = registry.with_run_seed(args.method, options, args.seed)
    from capjax.pruning.prune import check_options

    check_options(args.method, options)
    delta, scored = _load_delta(args.scores) if spec.needs_scores else (None, {})
    if delta is not None:  # the model's config is enough to know the scores belong to another model
        config = capjax.load_config(args.model)
        if delta.shape != (config.num_layers, config.num_heads):
            raise ValueError(
                f"{args.scores}: 'delta' is {list(delta.shape)} but {args.model} has "
                f"[{config.num_layers}, {config.num_heads}] heads: score this model with capjax score"
            )
        _check_scored_model(args.scores, scored, args.model)
    if spec.needs_calib:
        check_calibration_data(args.calib, args.data_dir)

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

        calib = build_calibration(
            args.calib, tokenizer, n=args.n, seq_len=args.seq_len, seed=args.seed, data_dir=args.data_dir
        )
    sparsity = args.sparsity
    if sparsity is None or nm is not None:
        sparsity = 0.2 if nm is None else 0.0  # with N:M the pattern sets the sparsity
    pruned, masks = prune(model, params, args.method, sparsity, head_scores=delta, calib=calib, nm=nm, **options)
    flat = {path: np.asarray(m) for path, m in flat_masks(masks).items()}
    report = sparsity_report(pruned)
    from capjax.experiment.folders import replaced_folder

    with replaced_folder(args.out, EXPORT_MARKER) as staging:  # written beside --out, then swapped in whole
        capjax.save_pretrained(model, pruned, staging, tokenizer, sparsity_format=args.sparsity_format)
        write_masks_npz(staging / "masks.npz", flat)
        if args.hf_masks:
            from capjax.io import hf_masks

            write_masks_npz(staging / "masks_hf.npz", hf_masks(model.config, flat))
        write_text(
            staging / EXPORT_MARKER,
            strict_json(
                {
                    "model": str(args.model),
                    "method": args.method,
                    "sparsity": sparsity,
                    "nm": args.nm,
                    "achieved_sparsity": report.total,
                    "options": options,
                    "dtype": args.dtype,
                    "scores": {"file": str(args.scores), "digest": file_digest(Path(args.scores))}
                    if delta is not None
                    else None,
                    "calibration": {"task": args.calib, "n": args.n, "seq_len": args.seq_len, "seed": args.seed}
                    if spec.needs_calib
                    else None,
                    "model_id": model_identity(args.model),
                    "masks_digest": masks_digest(flat),
                    "code": code_version(),
                }
            ),
        )
    out = Path(args.out)
    print(report.table())
    if args.method == "cap_heads":
        kept = np.asarray(flat["layers/self_attn/o_proj/kernel"]).any(axis=(2, 3))  # [L, H]
        print(f"cap_heads removed {int((~kept).sum())} of {kept.size} heads")
    print(f"wrote {out} (masks.npz: {len(flat)} masks)")
    return 0
