"""Exact channel-group ablation, side by side in one process: `channel_group_ablation_scores` of a
base commit (loaded from git) vs this checkout's, on SmolLM2-135M-Instruct and the quality table's
GSM8K calibration (seed 0). --rounds rounds in the same order (the first compiles); prints the
seconds, the largest score difference and the ratio of the medians of the rounds after the first.
--progress: this checkout's run shows its progress bar (as `capjax prune` and the quality script do).

    nice -n 10 python scripts/bench_group_ablation.py --data-dir ../shared/data --base 5dac267 --n-calib 2 --group 768
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="5dac267", help="commit whose capjax/structured/scores.py is the baseline")
    parser.add_argument("--n-calib", type=int, default=2)
    parser.add_argument("--group", type=int, default=768, help="channels per group")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=2, help="rounds (>= 2; the first compiles)")
    parser.add_argument("--progress", action="store_true", help="this checkout's run with progress=True")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: use 2 or more (the first round compiles)")

    import capjax
    from capjax.structured import scores as new

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{args.base}:capjax/structured/scores.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "base_scores.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("base_scores", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    base_kwargs = {"batch_size": 8} if "batch_size" in base.channel_group_ablation_scores.__code__.co_varnames else {}

    new_kwargs = {"progress": True} if args.progress else {}
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    cal = capjax.build_calibration("gsm8k", tok, n=args.n_calib, seq_len=256, seed=0, data_dir=args.data_dir)
    act = new.channel_activation_scores(model, params, cal.tokens, cal.attention_mask, batch_size=4)
    groups = new.rank_groups(act, args.group)
    runs = {
        args.base: lambda: base.channel_group_ablation_scores(
            model, params, cal.tokens, cal.loss_mask, groups, cal.attention_mask, **base_kwargs
        ),
        "this checkout": lambda: new.channel_group_ablation_scores(
            model, params, cal.tokens, cal.loss_mask, groups, cal.attention_mask, **new_kwargs
        ),
    }
    seconds: dict[str, list[float]] = {}
    out = {}
    for rnd in range(args.rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            out[name] = fn()
            seconds.setdefault(name, []).append(time.perf_counter() - t)
            print(f"round {rnd}: {name}: {seconds[name][-1]:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    a, b = out.values()
    print(
        f"{groups.shape[0] * (int(groups.max()) + 1)} group ablations; max |difference| {np.abs(a - b).max():.2e} "
        f"(max |score| {np.abs(b).max():.2f})"
    )
    med = {name: float(np.median(t[1:])) for name, t in seconds.items()}
    print(
        f"median of rounds 1-{args.rounds - 1}: {args.base} {med[args.base]:.1f} s / this checkout "
        f"{med['this checkout']:.1f} s = {med[args.base] / med['this checkout']:.3f}x"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
