"""Recovery table: SmolLM2-135M-Instruct pruned to 50% (cap, wanda, magnitude), WikiText-2 perplexity
and held-out GSM8K answer loss before and after N recovery steps, with error bars.

    python scripts/recovery_table.py [--steps 10] [--batch 2] [--seq-len 256] [--mode full]
        [--scores scores.npz] [--out docs/recovery]

Pruning calibration: 16 GSM8K train problems (T=256); CAP's head scores are the paper's exact
single-head ablation scores (`score_heads(method="ablation")`, K=3 subsets, median) on the first
--score-n of them, cached in runs/cap_scores_<key>.npz (key: a hash of the scoring calibration
tokens, masks and settings) so a rerun does not rescore; --scores gives a file with 'delta' [L, H]
instead (e.g. from `capjax score`). Recovery data: 64 other-seeded GSM8K train problems,
answer tokens in the loss, packed. Evaluation: the first --windows WikiText-2 test windows of 512
tokens (ppl = exp(mean NLL); error bar = ppl x the standard error of the per-window mean NLL)
and --eval-n GSM8K test problems (answer-token NLL, teacher-forced; error bar = bootstrap
standard error over problems, 1000 resamples). Writes OUT.json (every number and each method's
loss history) and OUT_loss.png, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

import capjax
from capjax.data import build_calibration, load_wikitext2_text
from capjax.evaluate.perplexity import token_logprobs
from capjax.pruning.importance import PRUNABLE, get_path
from capjax.recovery import RecoverySettings, build_recovery_data, plot_loss_curves, recover


def wikitext_windows(tokenizer, n_windows: int, T: int) -> np.ndarray:
    text = load_wikitext2_text()[: n_windows * T * 8]
    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
    return ids[: n_windows * T].reshape(n_windows, T)


def ppl_with_error(model, params, windows) -> tuple[float, float]:
    nll = np.array(
        [-float(token_logprobs(model, params, w[None])[0][0, 1:].astype(np.float64).mean()) for w in windows]
    )
    ppl = float(np.exp(nll.mean()))
    return ppl, ppl * float(nll.std(ddof=1) / np.sqrt(len(nll)))


def answer_loss_with_error(model, params, batch, seed: int = 0) -> tuple[float, float]:
    lp, _ = token_logprobs(model, params, batch.tokens, batch.attention_mask)
    w = batch.loss_mask.astype(np.float64)
    sums, counts = -(lp * w).sum(1), w.sum(1)
    rng = np.random.default_rng(seed)
    boot = [sums[i].sum() / counts[i].sum() for i in rng.integers(0, len(sums), (1000, len(sums)))]
    return float(sums.sum() / counts.sum()), float(np.std(boot))


def exact_cap_scores(model, params, calib, n: int, cache_dir: Path = Path("runs")) -> tuple[np.ndarray, str]:
    """CAP's exact ablation head scores delta [L, H] on the first n calibration rows, cached by content."""
    tokens, loss_mask, attn = calib.tokens[:n], calib.loss_mask[:n], calib.attention_mask[:n]
    h = hashlib.sha256(b"smollm2-135m-instruct|ablation|median|K=3")
    for a in (tokens, loss_mask, attn):
        h.update(np.ascontiguousarray(a).tobytes())
    path = cache_dir / f"cap_scores_{h.hexdigest()[:16]}.npz"
    if path.exists():
        return capjax.HeadScores.load(path).delta, (
            f"exact ablation head scores, {n} calibration problems (cached {path})"
        )
    t = time.perf_counter()
    scores = capjax.score_heads(
        model, params, tokens, loss_mask, attention_mask=attn, method="ablation", aggregate="median", progress=False
    )
    secs = time.perf_counter() - t
    cache_dir.mkdir(parents=True, exist_ok=True)
    scores.save(path, n=n, seconds=secs)
    return scores.delta, f"exact ablation head scores, {n} calibration problems ({secs:.1f} s, saved {path})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--mode", default="full", choices=("full", "lora"))
    ap.add_argument("--methods", default="cap,wanda,magnitude")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--eval-n", type=int, default=32)
    ap.add_argument("--scores", default=None)
    ap.add_argument("--score-n", type=int, default=8, help="calibration problems for CAP's exact scores")
    ap.add_argument("--out", default="docs/recovery")
    args = ap.parse_args()
    if not 1 <= args.score_n <= 16:
        ap.error(f"--score-n must be 1..16 (the pruning calibration has 16 problems), got {args.score_n}")
    t_start = time.perf_counter()

    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tokenizer = capjax.load_tokenizer("smollm2-135m-instruct")
    calib = build_calibration("gsm8k", tokenizer, n=16, seq_len=256, seed=0)
    heldout = build_calibration("gsm8k", tokenizer, n=args.eval_n, seq_len=256, seed=0, split="test")
    windows = wikitext_windows(tokenizer, args.windows, 512)
    train = build_recovery_data("gsm8k", tokenizer, n=64, seq_len=args.seq_len, seed=1)
    settings = RecoverySettings(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=min(2, args.steps - 1),
        mode=args.mode,
        batch_size=args.batch,
        seq_len=args.seq_len,
        n=64,
        seed=1,
    )

    def evaluate(p):
        return {
            "wikitext2_ppl": ppl_with_error(model, params if p is None else p, windows),
            "gsm8k_answer_loss": answer_loss_with_error(model, params if p is None else p, heldout),
        }

    rows = [{"method": "dense", **{f"before/{k}": v for k, v in evaluate(None).items()}}]
    if args.scores:
        with np.load(args.scores) as z:
            delta = z["delta"]
        score_note = f"scores from {args.scores}"
    else:
        delta, score_note = exact_cap_scores(model, params, calib, args.score_n)
        print(score_note, flush=True)
    histories = {}
    for method in args.methods.split(","):
        kw = {"head_scores": delta} if method.startswith("cap") else {"calib": calib} if method == "wanda" else {}
        pruned, masks = capjax.prune(model, params, method, args.sparsity, **kw)
        row = {"method": method, **{f"before/{k}": v for k, v in evaluate(pruned).items()}}
        t = time.perf_counter()
        recovered, hist = recover(model, pruned, masks, train, settings=settings, progress=False)
        row["recovery_seconds"] = time.perf_counter() - t
        row.update({f"after/{k}": v for k, v in evaluate(recovered).items()})
        row["sparsity_after"] = capjax.sparsity_report(recovered).total
        row["pruned_entries_all_zero"] = all(
            bool(np.all(np.asarray(get_path(recovered, p))[~np.asarray(get_path(masks, p))] == 0)) for p in PRUNABLE
        )
        histories[method] = hist
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - t_start
    meta = {
        "args": vars(args),
        "settings": settings.to_dict(),
        "scores": score_note,
        "total_seconds": total,
        "recovery_train_rows": len(train),
        "recovery_loss_tokens": train.loss_tokens,
    }
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows, "histories": histories}, indent=1))
    plot_loss_curves(
        histories,
        f"{out}_loss.png",
        title=f"SmolLM2-135M at {args.sparsity:.0%}: recovery loss ({args.mode}, GSM8K train answers)",
    )

    def cell(v):
        return f"{v[0]:.2f} ± {v[1]:.2f}" if v[0] > 10 else f"{v[0]:.3f} ± {v[1]:.3f}"

    print(f"\n{score_note}; total {total:.0f} s\n")
    print("| method | WikiText-2 ppl before | after | GSM8K answer loss before | after | recovery s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        after = [cell(r[f"after/{k}"]) if f"after/{k}" in r else "-" for k in ("wikitext2_ppl", "gsm8k_answer_loss")]
        secs = f"{r['recovery_seconds']:.0f}" if "recovery_seconds" in r else "-"
        print(
            f"| {r['method']} | {cell(r['before/wikitext2_ppl'])} | {after[0]} | "
            f"{cell(r['before/gsm8k_answer_loss'])} | {after[1]} | {secs} |"
        )


if __name__ == "__main__":
    main()
