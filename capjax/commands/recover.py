"""`capjax recover`: fine-tune a pruned model (full or sparse LoRA) keeping its zeros exact; writes
an HF folder, masks.npz and history.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from capjax.experiment.config import DTYPES, calibration_task_names
from capjax.recovery.settings import DEFAULTS, MODES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recover", help="fine-tune a pruned model without losing its zeros", description=__doc__)
    p.add_argument("--model", required=True, help="pruned HF folder (from `capjax prune`)")
    p.add_argument("--masks", default=None, help="masks.npz (default: MODEL/masks.npz)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument(
        "--data",
        default=DEFAULTS["data"],
        help=f"calibration task ({', '.join(calibration_task_names())}) or text:PATH (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--checkpoint-dir", default=None, help="orbax checkpoints (a rerun resumes); default OUT/checkpoints"
    )
    for name in (
        "steps",
        "lr",
        "warmup_steps",
        "weight_decay",
        "rank",
        "alpha",
        "batch_size",
        "grad_accum",
        "n",
        "seq_len",
        "seed",
        "checkpoint_every",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=type(DEFAULTS[name]), default=DEFAULTS[name])
    p.add_argument("--mode", default=DEFAULTS["mode"], choices=MODES)
    p.set_defaults(func=run)
    return p


def _check_recorded_masks(model: Path, masks_path: Path, flat: dict) -> None:
    """Masks other than those `capjax prune` recorded for this folder (capjax_prune.json's
    masks_digest, by content) are refused before the model loads."""
    from capjax.pruning.prune import masks_digest

    record = model / "capjax_prune.json"
    try:
        recorded = json.loads(record.read_text()).get("masks_digest") if record.is_file() else None
    except (ValueError, OSError, AttributeError):
        recorded = None
    if recorded is not None and masks_digest(flat) != recorded:
        raise ValueError(
            f"--masks {masks_path} are not the masks of this pruning ({record} records masks "
            f"{recorded}, the file holds {masks_digest(flat)}): pass {model / 'masks.npz'}"
        )


def _check_masks_fit_weights(model: str, masks_path: Path, params, flat: dict) -> None:
    """Masks that prune weights the model keeps (nonzero) come from another pruning: recovery would
    silently zero those weights. Refused, naming the count and a kernel."""
    from capjax.distributed import to_host
    from capjax.pruning.importance import PRUNABLE, get_path

    for p in PRUNABLE:
        w = np.asarray(to_host(get_path(params, p)))
        kept = int(np.count_nonzero(w[~np.asarray(flat[p], bool)] != 0))
        if kept:
            raise ValueError(
                f"--masks {masks_path} prune {kept} weights of {p} that {model} keeps (nonzero): the "
                f"masks come from another pruning; pass the masks.npz written with {model}"
            )


def run(args: argparse.Namespace) -> int:
    import capjax
    from capjax.experiment.config import check_writable_dir
    from capjax.pruning import sparsity_report
    from capjax.pruning.prune import masks_from_flat, read_masks_npz
    from capjax.recovery import RecoverySettings, run_recovery
    from capjax.recovery.settings import check_data_file

    settings = RecoverySettings.from_dict({k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)})
    check_data_file(settings)
    masks_path = Path(args.masks) if args.masks else Path(args.model) / "masks.npz"
    if not Path(args.model).exists():
        raise FileNotFoundError(f"--model folder not found: {args.model}")
    check_writable_dir(Path(args.out), "--out")  # before training, not after it
    if args.checkpoint_dir:
        check_writable_dir(Path(args.checkpoint_dir), "--checkpoint-dir")
    flat = read_masks_npz(masks_path)  # before the model loads
    _check_recorded_masks(Path(args.model), masks_path, flat)
    model, params = capjax.load_pretrained(args.model, dtype=args.dtype)
    masks = masks_from_flat(params, flat)
    from capjax.recovery import check_masks

    check_masks(params, masks)
    _check_masks_fit_weights(args.model, masks_path, params, flat)
    tokenizer = capjax.load_tokenizer(args.model)
    out_dir = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out_dir / "checkpoints"
    recovered, history = run_recovery(
        model, params, masks, tokenizer, settings, checkpoint_dir=ckpt, data_dir=args.data_dir
    )
    out = capjax.save_pretrained(model, recovered, out_dir, tokenizer)
    with np.load(masks_path) as z:
        np.savez_compressed(Path(out) / "masks.npz", **{k: z[k] for k in z.files})
    (Path(out) / "history.json").write_text(json.dumps(history, indent=1))
    print(sparsity_report(recovered).table())
    loss = history["loss"]
    print(f"recovery ({history['mode']}, {history['steps']} steps): loss {loss[0]:.4f} -> {loss[-1]:.4f}; wrote {out}")
    return 0
