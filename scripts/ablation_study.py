"""The worked example of a vectorized ablation study (copy it to write your own).

    python scripts/ablation_study.py [--model smollm2-135m-instruct] [--task synthetic] [--n 4]
        [--seq-len 96] [--top 30] [--out results/ablation_study]

On one prepared calibration batch, each step is one compiled, vmapped call of
`capjax.ablation.ablate`, and every score is computed afterwards from the per-example results:

1. all heads under zero, mean and resample ablation; Spearman correlation between the kinds;
2. the `--top` most important heads (zero ablation): every pair ablated together in one call, and
   interaction(a, b) = delta(a and b) - delta(a) - delta(b) (< 0: redundant, > 0: synergistic);
3. every MLP block and every whole attention block (zero ablation) beside the heads.

Each step is timed (compile included) and draws one figure under --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import capjax
from capjax import estimators
from capjax.ablation import ablate, pairs_spec, prepare_batch, single_spec, units
from capjax.data import build_calibration


def timed(what, fn):
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    print(f"{what}: {seconds:.1f} s")
    return out, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="synthetic", help="calibration set (gsm8k etc. need --data-dir)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--subsets", type=int, default=2)
    p.add_argument("--top", type=int, default=30, help="heads whose pairwise interactions are measured")
    p.add_argument("--out", default="results/ablation_study")
    args = p.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, params = capjax.load_pretrained(args.model)
    tokenizer = capjax.load_tokenizer(args.model)
    calib = build_calibration(args.task, tokenizer, n=args.n, seq_len=args.seq_len, seed=0, data_dir=args.data_dir)
    batch = prepare_batch(model, calib.tokens, calib.loss_mask, calib.attention_mask)
    c = model.config
    L, H = c.num_layers, c.num_heads
    print(
        f"{args.model}: {L} layers x {H} heads; {args.task} N={args.n} T={args.seq_len}: "
        f"{batch.packed.tokens.shape[0]} packed rows x {batch.packed.tokens.shape[1]}, "
        f"prefix {batch.packed.prefix_len}, {batch.num_answer_tokens} answer tokens"
    )

    def score(res):  # the paper's estimator, from the per-example results
        return estimators.estimate("median", res.values, res.intact, res.count, subsets=args.subsets)

    # 1. every head, three ablation kinds
    heads = single_spec(c, "heads")
    kinds = {}
    for kind in ("zero", "mean", "resample"):
        res, _ = timed(
            f"{L * H} head ablations, {kind}", lambda kind=kind: ablate(model, params, batch, heads, kind=kind)
        )
        kinds[kind] = score(res).reshape(L, H)
    names = list(kinds)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rho = spearmanr(kinds[a].ravel(), kinds[b].ravel())[0]
            print(f"Spearman({a}, {b}) over {L * H} heads: {rho:.3f}")
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.22 * L + 2))
    for ax, kind in zip(axes, names):
        lim = float(np.abs(kinds[kind]).max()) or 1.0
        im = ax.imshow(kinds[kind], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"{kind} ablation")
        ax.set_xlabel("head")
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("layer")
    fig.tight_layout()
    fig.savefig(out / "head_scores_by_kind.png", dpi=110)
    plt.close(fig)

    # 2. pairwise interactions of the top heads, all pairs in one call
    order = np.argsort(-kinds["zero"].ravel())[: args.top]
    top = [("heads", int(k // H), int(k % H)) for k in order]
    spec, pairs = pairs_spec(c, top)
    res, _ = timed(
        f"{len(pairs)} pair ablations of the top {len(top)} heads", lambda: ablate(model, params, batch, spec)
    )
    pair_delta = score(res)
    single = kinds["zero"].ravel()[order]
    inter = np.zeros((len(top), len(top)))
    for n, (i, j) in enumerate(pairs):
        inter[i, j] = inter[j, i] = pair_delta[n] - single[i] - single[j]
    k = np.unravel_index(np.argmin(inter), inter.shape)
    m = np.unravel_index(np.argmax(inter), inter.shape)
    print(
        f"most redundant pair: {top[k[0]][1:]} & {top[k[1]][1:]} ({inter[k]:+.4f}); "
        f"most synergistic: {top[m[0]][1:]} & {top[m[1]][1:]} ({inter[m]:+.4f})"
    )
    fig, ax = plt.subplots(figsize=(8, 7))
    lim = float(np.abs(inter).max()) or 1.0
    im = ax.imshow(inter, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    labels = [f"{l}.{h}" for _, l, h in top]
    ax.set_xticks(range(len(top)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(top)), labels, fontsize=7)
    ax.set_title("pair interaction: delta(a,b) - delta(a) - delta(b)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "head_pair_interactions.png", dpi=110)
    plt.close(fig)

    # 3. MLP blocks and whole attention blocks beside the heads
    blocks = {}
    for component in ("mlp", "attn"):
        res, _ = timed(
            f"{L} {component}-block ablations",
            lambda component=component: ablate(model, params, batch, single_spec(c, component)),
        )
        blocks[component] = score(res)
    assert [u[1] for u in units(c, "mlp")] == list(range(L))
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(L)
    ax.bar(x - 0.27, blocks["mlp"], 0.27, label="MLP block")
    ax.bar(x, blocks["attn"], 0.27, label="attention block")
    ax.bar(x + 0.27, kinds["zero"].sum(axis=1), 0.27, label="sum of its head scores")
    ax.set_xlabel("layer")
    ax.set_xticks(x)
    ax.set_ylabel("loss increase when ablated")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "block_scores.png", dpi=110)
    plt.close(fig)
    print(
        f"most important MLP block: layer {int(np.argmax(blocks['mlp']))} ({blocks['mlp'].max():+.4f}); "
        f"attention block: layer {int(np.argmax(blocks['attn']))} ({blocks['attn'].max():+.4f})"
    )
    np.savez(
        out / "study.npz",
        **{f"heads_{k}": v for k, v in kinds.items()},
        interactions=inter,
        top=np.array([[l, h] for _, l, h in top]),
        **{f"{k}_blocks": v for k, v in blocks.items()},
    )
    print(
        f"figures and study.npz in {out}; whole study {time.perf_counter() - t_start:.1f} s "
        "(model load and calibration included)"
    )


if __name__ == "__main__":
    main()
