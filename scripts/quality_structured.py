"""Quality of structured SmolLM2-135M-Instruct, one run: which scores choose what to remove, at equal
parameter counts, before and after recovery, beside unstructured pruning and torch-pruning.

For each target (--fractions, default 25% and 50% of the decoder layers' parameters removed:
`budget_shape(config, 1 - f)`, heads and MLP channels alike):

    CAP heads + Minitron channels   CAP head scores + mean |activation| channels (`cap_structured`'s
                                    default). CAP head scores (--head-scores): exact ablation of
                                    every head, `capjax.score_heads(method="ablation")`, the median
                                    over --head-subsets calibration subsets (CAP's score; default),
                                    or the gradient estimate
    CAP heads + CAP channel groups  (--mlp-group N) CAP head scores + exact ablation of groups of N
                                    channels of neighbouring activation rank (`cap_structured`'s
                                    mlp_score="ablation", mlp_group=N)
    CAP heads + Taylor channels     (--taylor) CAP head scores + |d answer loss / d channel| (causal,
                                    first order)
    Minitron (activation)           mean ||attn.z|| heads + mean |activation| channels
    random                          random heads and channels (seed 0)
    torch-pruning (magnitude)       scripts/torch_pruning_peer.py in a subprocess of --tp-python (an
                                    environment with transformers 4.45: see that script), --tp-timeout
                                    s; where it fails at the first fraction, not again
    unstructured CAP / Wanda        `capjax.prune` at the sparsity of the kernels that removes the same
                                    number of parameters (same count, dense shapes)
    + CE / + distil                 --recover rows: `capjax.recover` --steps steps on GSM8K train
                                    answers, CE only vs logit distillation from the dense model
                                    (temperature 1, KL only, at every real position of the
                                    examples), same steps, data, lr and batch

Scores from --n-calib GSM8K train examples. Quality, each with a 95% interval: WikiText-2 perplexity
(--wiki-windows windows of --wiki-seq tokens, bootstrap over windows), GSM8K answer loss (NLL per
answer token of --n-eval test examples, bootstrap over examples), ARC-Challenge accuracy by
log-likelihood as lm-eval's arc_challenge (--n-arc test questions, Wilson interval).

    nice -n 10 python scripts/quality_structured.py --data-dir ../shared/data --out quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)


def evaluate(model, params, tok, args, recs) -> dict:
    """{"ppl", "answer_loss", "arc"}: each {"value", "low", "high", "n"}."""
    from capjax.evaluate.perplexity import wikitext2_perplexity
    from capjax.evaluate.tasks import answer_loss, arc_loglikelihood
    from capjax.stats import binomial_interval, bootstrap_ratio

    w = wikitext2_perplexity(
        model, params, tok, data_dir=args.data_dir, seq_len=args.wiki_seq, limit_windows=args.wiki_windows, batch_size=4
    )
    ppl = bootstrap_ratio(w["window_nll"], [w["seq_len"] - 1.0] * w["n_windows"], transform="exp")
    _, pairs = answer_loss(model, params, tok, recs["gsm8k"], task="gsm8k", batch_size=8, per_example=True)
    al = bootstrap_ratio([a for a, _ in pairs], [float(b) for _, b in pairs])
    arc, samples = arc_loglikelihood(model, params, tok, recs["arc"], batch_size=16)
    acc = binomial_interval(sum(s["pred"] == s["target"] for s in samples), len(samples))
    return {
        k: {"value": e.value, "low": e.low, "high": e.high, "n": e.n}
        for k, e in (("ppl", ppl), ("answer_loss", al), ("arc", acc))
    }


def torch_pruning_row(heads: int, mlp: int, timeout: float, python: str) -> tuple[str | None, str]:
    """(folder of the pruned model or None, what happened in one line); `python`: the interpreter of
    the environment that has torch-pruning (scripts/torch_pruning_peer.py: transformers 4.45)."""
    from capjax.io import smollm2_gguf_path

    out = tempfile.mkdtemp(prefix="tp_peer_")
    cmd = [python, str(HERE / "torch_pruning_peer.py"), "--heads", str(heads), "--mlp", str(mlp), "--out", out]
    cmd += ["--gguf", str(smollm2_gguf_path())]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        return None, (
            f"did not finish in {timeout:.0f} s: BasePruner construction (dependency-graph walk) "
            f"never ended; last output: {last[0]}"
        )
    if p.returncode != 0:
        return None, f"failed (exit {p.returncode}): {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    shapes = json.loads(p.stdout.strip().splitlines()[-1])
    shapes.pop("kept_query_heads", None)
    return out, f"pruned in {time.perf_counter() - t0:.0f} s: {shapes}"


def print_table(rows: list[dict], args) -> None:
    """The markdown table of the rows (also from a saved --out JSON: --table FILE)."""
    heads = "exact ablation" if getattr(args, "head_scores", "gradient") == "ablation" else "gradient estimate"
    heads += f", median over {args.head_subsets} subsets" if hasattr(args, "head_subsets") else ""
    groups = f"; CAP channel groups of {args.mlp_group}" if getattr(args, "mlp_group", 0) else ""
    print(
        f"\nSmolLM2-135M-Instruct; scores from {args.n_calib} GSM8K train examples (CAP heads: "
        f"{heads}{groups}); WikiText-2 perplexity on "
        f"{args.wiki_windows} windows of {args.wiki_seq} tokens; GSM8K answer loss on {args.n_eval} test examples; "
        f"ARC-Challenge accuracy (log-likelihood) on {args.n_arc} test questions; 95% intervals (bootstrap / "
        f"Wilson); recovery {args.steps} steps x {args.recover_batch} rows x {args.recover_seq} tokens of GSM8K "
        f"train, lr {args.lr:g}\n"
    )
    print("| removed | model | stage | params | WikiText-2 ppl | GSM8K answer loss | ARC-Challenge acc | note |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(q, fmt):
        return f"{q['value']:{fmt}} [{q['low']:{fmt}}, {q['high']:{fmt}}]"

    for r in rows:
        size = "" if r["params"] is None else f"{r['params'] / 1e6:.1f}M"
        r = {**r, "stage": "" if r["fraction"] == 0 else r["stage"]}
        if "ppl" not in r:
            print(f"| {r['fraction']:.0%} | {r['model']} | {r['stage']} | {size} | - | - | - | {r['note']} |")
            continue
        print(
            f"| {r['fraction']:.0%} | {r['model']} | {r['stage']} | {size} | {cell(r['ppl'], '.1f')} | "
            f"{cell(r['answer_loss'], '.3f')} | {cell(r['arc'], '.3f')} | {r['note']} |"
        )


def compute_scores(
    model, params, cal, head_scores: str = "ablation", subsets: int = 3, mlp_group: int = 0, taylor: bool = False
) -> dict:
    """Every score the rows need, from the calibration batch cal (tokens, loss_mask, attention_mask
    [B, T]), and the seconds each took: {"heads": HeadScores (delta [L, H]), "act" [L, F], "head_act"
    [L, H], "grad" [L, F] (taylor), "groups" [L, F] and "group_delta" [L, Y] (mlp_group), "seconds"}."""
    import capjax
    from capjax.structured import scores as S

    out: dict = {"seconds": {}}

    def timed(name, fn):
        t = time.perf_counter()
        out[name] = fn()
        out["seconds"][name] = round(time.perf_counter() - t, 1)

    timed(
        "heads",
        lambda: capjax.score_heads(
            model,
            params,
            cal.tokens,
            cal.loss_mask,
            attention_mask=cal.attention_mask,
            method=head_scores,
            subsets=subsets,
            aggregate="median",
            progress=True,
        ),
    )
    timed("act", lambda: S.channel_activation_scores(model, params, cal.tokens, cal.attention_mask, batch_size=4))
    timed("head_act", lambda: S.head_activation_scores(model, params, cal.tokens, cal.attention_mask, batch_size=4))
    if taylor:
        timed(
            "grad",
            lambda: S.channel_gradient_scores(
                model, params, cal.tokens, cal.loss_mask, cal.attention_mask, batch_size=4
            ),
        )
    if mlp_group:
        out["groups"] = S.rank_groups(out["act"], mlp_group)
        timed(
            "group_delta",
            lambda: S.channel_group_ablation_scores(
                model, params, cal.tokens, cal.loss_mask, out["groups"], cal.attention_mask, progress=True
            ),
        )
    return out


def row_plans(config, shape, sc: dict, seed: int = 0) -> dict:
    """{row name: `capjax.structured.Plan`} of the structured rows at one shape, from `compute_scores`'
    scores; random: heads and channels by random scores (seed)."""
    from capjax.structured import choose
    from capjax.structured import scores as S

    c, delta = config, sc["heads"].delta
    rng = np.random.default_rng(seed)
    rand_h, rand_c = rng.normal(size=(c.num_layers, c.num_heads)), rng.normal(size=(c.num_layers, c.intermediate_size))
    plans = {"CAP heads + Minitron channels": choose(c, shape, delta, sc["act"])}
    if "group_delta" in sc:
        chan = S.group_scores_to_channels(sc["group_delta"], sc["groups"], sc["act"])
        plans["CAP heads + CAP channel groups"] = choose(c, shape, delta, chan)
    if "grad" in sc:
        plans["CAP heads + Taylor channels"] = choose(c, shape, delta, np.abs(sc["grad"]))
    plans["Minitron (activation heads + channels)"] = choose(c, shape, sc["head_act"], sc["act"])
    plans["random"] = choose(c, shape, rand_h, rand_c)
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="0.25,0.5", help="fractions of the decoder layers' parameters removed")
    parser.add_argument("--n-calib", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256, help="calibration length")
    parser.add_argument("--n-eval", type=int, default=16, help="GSM8K test examples (answer loss)")
    parser.add_argument("--n-arc", type=int, default=100)
    parser.add_argument("--wiki-windows", type=int, default=4)
    parser.add_argument("--wiki-seq", type=int, default=256)
    parser.add_argument("--taylor", action="store_true", help="also CAP heads + Taylor channels")
    parser.add_argument("--recover", default="0.25", help="fractions whose CAP-guided model is recovered")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--recover-batch", type=int, default=4)
    parser.add_argument("--recover-seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tp-timeout", type=float, default=300.0)
    parser.add_argument(
        "--tp-python",
        default=sys.executable,
        help="python of an environment with torch-pruning 1.6.1 and transformers 4.45 (scripts/torch_pruning_peer.py)",
    )
    parser.add_argument(
        "--head-scores",
        default="ablation",
        choices=("ablation", "gradient"),
        help="CAP head scores: exact ablation of every head (CAP's score) or the gradient estimate",
    )
    parser.add_argument(
        "--head-subsets", type=int, default=3, help="calibration subsets of the CAP head scores (median over them)"
    )
    parser.add_argument(
        "--mlp-group",
        type=int,
        default=0,
        help="also CAP heads + CAP channel groups: exact ablation of groups of this many channels (0: no such row)",
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="JSON of every row (written after each row)")
    parser.add_argument("--table", default=None, help="only print the table of a saved --out JSON")
    args = parser.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print_table(saved["rows"], argparse.Namespace(**saved["args"]))
        return

    import jax.numpy as jnp  # noqa: F401  (jax first: one backend for the whole run)

    import capjax
    from capjax.data import eval_records
    from capjax.structured import budget_shape, shrink
    from capjax.structured.plan import layer_params

    t0 = time.perf_counter()
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    c = model.config
    if args.mlp_group and not 1 <= args.mlp_group <= c.intermediate_size:
        parser.error(f"--mlp-group {args.mlp_group}: channels per group must be 1 to {c.intermediate_size}")
    cal = capjax.build_calibration("gsm8k", tok, n=args.n_calib, seq_len=args.seq_len, seed=0, data_dir=args.data_dir)
    recs = {
        "gsm8k": eval_records("gsm8k", n=args.n_eval, seed=1, data_dir=args.data_dir),
        "arc": eval_records("arc_challenge", n=args.n_arc, seed=1, data_dir=args.data_dir),
    }
    sc = compute_scores(model, params, cal, args.head_scores, args.head_subsets, args.mlp_group, args.taylor)
    delta = sc["heads"].delta
    log(t0, f"scores done, seconds: {sc['seconds']}")
    saved = {"head_delta": np.round(delta, 6).tolist()}  # [L, H], written with the rows
    if "group_delta" in sc:
        saved["group_delta"] = np.round(sc["group_delta"], 6).tolist()  # [L, Y]
    kernels = sum(
        int(np.prod(v["kernel"].shape))
        for block in ("self_attn", "mlp")
        for v in params["layers"][block].values()
        if isinstance(v, dict) and "kernel" in v
    )  # 7 projections
    rows: list[dict] = []

    def add(name, frac, size, m, p, stage="pruned", note=""):
        q = evaluate(m, p, tok, args, recs)
        rows.append({"model": name, "fraction": frac, "params": size, "stage": stage, "note": note, **q})
        log(
            t0,
            f"{name} ({stage}): ppl {q['ppl']['value']:.2f}, answer loss {q['answer_loss']['value']:.3f}, "
            f"ARC {q['arc']['value']:.3f}",
        )
        if args.out:
            run = {"args": vars(args), "score_seconds": sc["seconds"], "scores": saved, "rows": rows}
            Path(args.out).write_text(json.dumps(run, indent=1))

    add("dense", 0.0, c.num_params(), model, params)
    recover_fracs = {float(f) for f in args.recover.split(",") if f}
    train = capjax.build_calibration(
        "gsm8k", tok, n=args.recover_batch * args.steps, seq_len=args.recover_seq, seed=2, data_dir=args.data_dir
    )
    tp_failed = None
    for frac in (float(f) for f in args.fractions.split(",")):
        shape = budget_shape(c, 1.0 - frac)
        small_cfg = shape.config(c)
        size = small_cfg.num_params()
        log(t0, f"{frac:.0%}: {shape.describe(c)}")
        for name, plan in row_plans(c, shape, sc).items():
            m, p = shrink(model, params, plan)
            add(name, frac, size, m, p)
            if name == "CAP heads + Minitron channels" and frac in recover_fracs:
                for how, teacher in (("+ CE", None), ("+ distil", (model, params))):
                    t1 = time.perf_counter()
                    rp, hist = capjax.recover(
                        m,
                        p,
                        None,
                        train,
                        steps=args.steps,
                        teacher=teacher,
                        temperature=1.0,
                        ce_weight=0.0,
                        progress=False,
                        mode="full",
                        lr=args.lr,
                        batch_size=args.recover_batch,
                        remat=False,
                    )
                    note = (
                        f"{args.steps} steps in {time.perf_counter() - t1:.0f} s, train loss "
                        f"{hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f}"
                    )
                    add(name, frac, size, m, rp, stage=how, note=note)
        if tp_failed is None:
            folder, what = torch_pruning_row(shape.num_heads, shape.intermediate_size, args.tp_timeout, args.tp_python)
            tp_failed = what if folder is None else None
        else:
            folder, what = None, f"not run again (at the first fraction it {tp_failed[:40]}...)"
        log(t0, f"torch-pruning {frac:.0%}: {what}")
        if folder is None:
            rows.append(
                {
                    "model": "torch-pruning (magnitude)",
                    "fraction": frac,
                    "params": None,
                    "stage": "pruned",
                    "note": what,
                }
            )
        else:
            m, p = capjax.load_pretrained(folder)
            add("torch-pruning (magnitude)", frac, m.config.num_params(), m, p, note=what)
        removed = layer_params(c) - layer_params(small_cfg)
        sparsity = removed / kernels
        calib = {"tokens": cal.tokens, "attention_mask": cal.attention_mask}
        for method in ("cap", "wanda"):
            p, _ = capjax.prune(model, params, method, sparsity, head_scores=delta, calib=calib)
            add(
                f"unstructured {method.upper() if method == 'cap' else 'Wanda'}",
                frac,
                size,
                model,
                p,
                note=f"sparsity {sparsity:.4f} of the kernels (zeros, dense shapes)",
            )

    print_table(rows, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s (wall)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
