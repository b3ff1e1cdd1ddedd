"""Arguments shared by the subcommands: which model, which calibration set."""

from __future__ import annotations

from capjax.experiment import CALIB_TASKS


def add_model_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="HF folder, .gguf file, hub id, or 'smollm2-135m-instruct'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_calibration_args(p) -> None:
    p.add_argument("--calib", default="synthetic", choices=CALIB_TASKS, help="calibration set")
    p.add_argument("--data-dir", default=None, help="folder with gsm8k/, strategyqa/, arc_challenge/ "
                   "(default: $CAPJAX_DATA)")
    p.add_argument("--n", type=int, default=128, help="calibration examples")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (pad or truncate)")
    p.add_argument("--seed", type=int, default=0)


def load_model(args):
    import capjax

    model, params = capjax.load_pretrained(args.model, dtype=args.dtype)
    return model, params, capjax.load_tokenizer(args.model)


def load_calibration(args, tokenizer):
    from capjax.data import build_calibration

    calib = build_calibration(args.calib, tokenizer, n=args.n, seq_len=args.seq_len, seed=args.seed,
                              data_dir=args.data_dir)
    if calib.n_truncated:
        print(f"calibration: {calib.n_truncated} of {args.n} examples truncated to {args.seq_len} tokens")
    return calib
