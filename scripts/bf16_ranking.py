"""How much does bfloat16 change CAP's head ranking? SmolLM2-135M-Instruct, float32 vs bfloat16.

    python scripts/bf16_ranking.py [--n 6] [--seq-len 128] [--subsets 3]

Scores every head twice on the same synthetic calibration batch (params and activations in the
given dtype; logits, log-softmax and loss sums are float32 in both) and prints the Spearman rank
correlation of delta [L, H] over all heads, the per-subset Spearman of the masked losses, the
overlap of the lowest-scored 20% / 50% of heads (those CAP prunes first) and the wall times.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import numpy as np
from scipy.stats import spearmanr

import capjax


def score(dtype: str, calib, subsets: int):
    model, params = capjax.load_pretrained("smollm2-135m-instruct", dtype=dtype)
    t = time.perf_counter()
    s = capjax.score_heads(
        model,
        params,
        calib.tokens,
        calib.loss_mask,
        subsets=subsets,
        attention_mask=calib.attention_mask,
        progress=False,
    )
    return s, time.perf_counter() - t


def lowest_overlap(a: np.ndarray, b: np.ndarray, frac: float) -> float:
    """|lowest-frac heads of a ∩ of b| / their number."""
    n = max(1, int(round(frac * a.size)))
    return len(set(np.argsort(a, kind="stable")[:n]) & set(np.argsort(b, kind="stable")[:n])) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--subsets", type=int, default=3)
    a = p.parse_args()
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    calib = capjax.data.build_calibration("synthetic", tok, n=a.n, seq_len=a.seq_len, seed=0)
    print(
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.processor() or platform.machine()}"
        f"  jax {jax.__version__}  {jax.devices()[0].device_kind}  n={a.n} seq_len={a.seq_len} K={a.subsets}",
        flush=True,
    )
    f32, t32 = score("float32", calib, a.subsets)
    print(f"float32 scoring: {t32:.1f} s, baseline {np.round(f32.baseline, 4).tolist()}", flush=True)
    b16, t16 = score("bfloat16", calib, a.subsets)
    print(f"bfloat16 scoring: {t16:.1f} s, baseline {np.round(b16.baseline, 4).tolist()}", flush=True)
    d32, d16 = f32.delta.reshape(-1), b16.delta.reshape(-1)
    print(f"heads: {d32.size}")
    print(f"Spearman(delta f32, delta bf16) over all heads: {spearmanr(d32, d16).statistic:.4f}")
    for k in range(a.subsets):
        rho = spearmanr(f32.masked[k].reshape(-1), b16.masked[k].reshape(-1)).statistic
        print(f"Spearman(masked loss, subset {k}): {rho:.4f}")
    print(
        f"max |delta f32 - delta bf16|: {np.abs(d32 - d16).max():.4g} "
        f"(delta f32 range {d32.min():.4g} .. {d32.max():.4g})"
    )
    for frac in (0.2, 0.5):
        print(f"overlap of the lowest {int(frac * 100)}% heads: {lowest_overlap(d32, d16, frac):.3f}")


if __name__ == "__main__":
    main()
