"""Arguments shared by the subcommands: which model, which calibration set. Their defaults are
the run config's (capjax.experiment.config), so a flag and a config key never disagree."""

from __future__ import annotations

import argparse
from pathlib import Path

from capjax.experiment.config import DTYPES, CalibrationConfig, RunConfig, calibration_task_names

_CALIB = CalibrationConfig()


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def add_model_args(p) -> None:
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="HF folder, .gguf file, hub id, or 'smollm2-135m-instruct'"
    )
    p.add_argument("--dtype", default=RunConfig.dtype, choices=DTYPES)


def add_calibration_args(p) -> None:
    p.add_argument("--calib", default=_CALIB.tasks[0], choices=calibration_task_names(), help="calibration set")
    p.add_argument(
        "--data-dir", default=None, help="folder with gsm8k/, strategyqa/, arc_challenge/ (default: $CAPJAX_DATA)"
    )
    p.add_argument("--n", type=positive_int, default=_CALIB.n, help="calibration examples")
    p.add_argument("--seq-len", type=positive_int, default=_CALIB.seq_len, help="tokens per example (pad or truncate)")
    p.add_argument("--seed", type=non_negative_int, default=RunConfig.seed)


def output_file(path: str, suffix: str) -> Path:
    """The file an --out flag names, with `suffix` added when missing; its folder is created and
    proven writable now, before any compute, so a result is never lost at the end."""
    from capjax.experiment.config import check_writable_dir

    p = Path(path)
    if p.suffix != suffix:
        p = p.with_name(p.name + suffix)
    if p.is_dir():
        raise ValueError(f"--out {p} is a folder: name a {suffix} file")
    check_writable_dir(p.parent, "--out folder")
    return p


def check_calibration_data(task: str, data_dir: str | None) -> None:
    """The calibration set's data file exists (before the model loads), or a one-line error."""
    from capjax.data.sources import resolve_data_dir
    from capjax.data.task import get_task

    t = get_task(task)
    rel = t.file(t.calib_split)
    if rel is None:
        return
    root = resolve_data_dir(data_dir)
    if root is None or not (root / rel).is_file():
        import importlib.util

        if data_dir is None and importlib.util.find_spec("datasets") is not None:
            return  # capjax.data downloads it with `datasets`
        raise FileNotFoundError(
            f"--calib {task} needs {rel} under --data-dir (looked in "
            f"{root if root is not None else '$CAPJAX_DATA and ../shared/data'}); pass --data-dir DIR"
        )


def check_eval_data(tasks: list[str], data_dir: str | None) -> None:
    """Every task's data file exists (all checked before the model loads), or one line naming each
    missing one. Without --data-dir, a file that `datasets` can download (GSM8K, ARC, WikiText-2)
    may be missing when that package is installed."""
    import importlib.util

    from capjax.data.sources import HUB_FILES, resolve_data_dir
    from capjax.experiment.config import eval_data_file

    root = resolve_data_dir(data_dir)
    downloads = data_dir is None and importlib.util.find_spec("datasets") is not None
    files = {t: eval_data_file(t) for t in tasks}
    missing = [
        f"{t} needs {file}"
        for t, file in files.items()
        if file is not None and (root is None or not (root / file).is_file()) and not (downloads and file in HUB_FILES)
    ]
    if missing:
        where = f"--data-dir {root}" if root is not None else "$CAPJAX_DATA and ../shared/data"
        raise FileNotFoundError(
            f"missing data in {where}: {'; '.join(missing)}; pass --data-dir DIR holding them (or drop those tasks)"
        )


def load_model(args):
    import capjax

    model, params = capjax.load_pretrained(args.model, dtype=args.dtype)
    return model, params, capjax.load_tokenizer(args.model)


def load_calibration(args, tokenizer):
    from capjax.data import build_calibration

    calib = build_calibration(
        args.calib, tokenizer, n=args.n, seq_len=args.seq_len, seed=args.seed, data_dir=args.data_dir
    )
    if calib.n_truncated:
        print(f"calibration: {calib.n_truncated} of {args.n} examples truncated to {args.seq_len} tokens")
    return calib
