"""Before/after speed of a refactor, side by side in one run, on SmolLM2-135M-Instruct (float32, no torch).

    python scripts/bench_refactor.py --baseline 7e92ba9 [--rounds 3] [--n 6] [--seq-len 128] [--reps 2]

extracts the baseline commit's tree (`git archive`) to a temporary folder, then runs the same
measurement in fresh subprocesses, alternately importing the baseline's capjax and this tree's
(the order flips every round, so drift in machine load hits both alike), and prints each one's
median over the rounds and the ratio baseline / current (> 1: the current tree is faster).

Measured, each as the best of `reps` warm (compiled) wall times: exact head scoring (score_heads,
all L * H heads), gradient head scores (score_heads(method="gradient")), every single MLP block
ablated by its mean with the KL metric (`capjax.ablation.ablate`), a full-logits forward over the
calibration batch (evaluation's path), and greedy
generation of 16 tokens for 4 prompts (the KV-cache path); `--only forward,generate` skips the
scoring. `build_parser` (one warm `capjax.cli.build_parser()`, the mean of 50) and `cli_help` (a
fresh `python -m capjax.cli --help`, startup included) time the CLI; `--only build_parser,cli_help`
loads no model. The checksums (sum of |delta|) of the three scorings must agree. Named in --only (not run
by default): wanda (prune 50%, its sequential layer pass), sparsegpt_pass (SparseGPT's sequential
pass of Hessian statistics and layer forwards, nothing pruned: everything but its OBS sweep),
head_activation and channel_activation (the structured scores' activation passes; their checksums
and wanda's kept-weight count must agree too).

    PYTHONPATH=/some/tree python scripts/bench_refactor.py --measure

measures whichever capjax is on PYTHONPATH once and prints one JSON line.

    python scripts/bench_refactor.py --baseline 4a1d61e --cost

compares XLA's cost analysis instead of wall time (`jax.jit(f).lower(...).compile().cost_analysis()`:
flops and bytes accessed; deterministic, so one round): the plain forward [B, T] = [8, 256], one
greedy generation call (prefill + decode loop, 4 x 32 prompt tokens, 16 new) and the exact scoring
kernel (`single_head_nll` over all layers, one packed calibration batch) and `masked_nll` on 8 head
masks (head_ablation_losses' kernel), on SmolLM2's shapes
(abstract params: nothing is loaded or run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURES = (
    "score_heads",
    "gradient",
    "ablate",
    "forward",
    "generate",
    "build_parser",
    "cli_help",
    "wanda",
    "sparsegpt_pass",
    "head_activation",
    "channel_activation",
)
CLI_MEASURES = ("build_parser", "cli_help")  # need no model: `--only build_parser,cli_help` loads none
DEFAULT = MEASURES[:7]  # the pruning / structured rows run only when named in --only


def _best(f, reps: int) -> float:
    f()  # compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_cli(reps: int, only: tuple[str, ...]) -> dict:
    """build_parser: one warm `capjax.cli.build_parser()` (the mean of 50 calls, best of `reps`);
    cli_help: the wall time of a fresh `python -m capjax.cli --help` (best of `reps`)."""
    from capjax import cli

    out = {}
    if "build_parser" in only:
        out["build_parser"] = _best(lambda: [cli.build_parser() for _ in range(50)], reps) / 50
    if "cli_help" in only:
        cmd = [sys.executable, "-m", "capjax.cli", "--help"]
        out["cli_help"] = _best(lambda: subprocess.run(cmd, check=True, capture_output=True), reps)
    return out


def measure(n: int, seq_len: int, reps: int, only: tuple[str, ...] = MEASURES) -> dict:
    cli_times = measure_cli(reps, only)
    if all(k in CLI_MEASURES for k in only):
        import capjax.cli

        return {"capjax": capjax.cli.__file__, "checksums": {}, **cli_times}
    import jax
    import jax.numpy as jnp
    import numpy as np

    import capjax
    from capjax.attribution import score_heads
    from capjax.data import build_calibration
    from capjax.evaluate import generate

    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    calib = build_calibration("synthetic", tok, n=n, seq_len=seq_len, seed=0)
    out = {}

    def score():
        out["s"] = score_heads(
            model, params, calib.tokens, calib.loss_mask, 2, attention_mask=calib.attention_mask, progress=False
        )

    def gradient():
        out["g"] = score_heads(
            model,
            params,
            calib.tokens,
            calib.loss_mask,
            2,
            method="gradient",
            attention_mask=calib.attention_mask,
            progress=False,
        )

    def ablate_mlp():
        from capjax.ablation import ablate, prepare_batch, single_spec

        batch = prepare_batch(model, calib.tokens, calib.loss_mask, calib.attention_mask)
        out["a"] = ablate(model, params, batch, single_spec(model.config, "mlp"), kind="mean", metric="kl")

    fwd = jax.jit(model.apply)

    def forward():
        fwd({"params": params}, calib.tokens, attention_mask=calib.attention_mask).block_until_ready()

    prompts = [list(r[m > 0][:24]) for r, m in zip(calib.tokens[:4], calib.attention_mask[:4])]

    def gen():
        generate(model, params, prompts, 16, batch_size=4, eos_ids=[])

    def wanda():
        from capjax.pruning import prune

        out["w"] = prune(model, params, "wanda", 0.5, calib=calib, batch_size=4)[1]
        jax.block_until_ready(out["w"])

    def sparsegpt_pass():
        # SparseGPT's sequential pass (Hessian statistics of every layer's projection inputs, then the
        # layer's forward) with nothing pruned: the part of sparsegpt that is not its OBS sweep.
        from capjax.pruning.importance import get_kernels
        from capjax.pruning.methods import Job, sequential_pass

        am = calib.attention_mask
        job = Job(model, params, get_kernels(params), 0.5, None, None, None, calib.tokens, am, {"batch_size": 4})
        keep = lambda l, k, stats, n: (k, {p: jnp.ones(w.shape, bool) for p, w in k.items()})  # noqa: E731
        jax.block_until_ready(sequential_pass(job, "hessian", keep))

    def head_activation():
        from capjax.structured.scores import head_activation_scores

        out["h"] = head_activation_scores(model, params, calib.tokens, calib.attention_mask, batch_size=4)

    def channel_activation():
        from capjax.structured.scores import channel_activation_scores

        out["c"] = channel_activation_scores(model, params, calib.tokens, calib.attention_mask, batch_size=4)

    fns = {
        "score_heads": score,
        "gradient": gradient,
        "ablate": ablate_mlp,
        "forward": forward,
        "generate": gen,
        "wanda": wanda,
        "sparsegpt_pass": sparsegpt_pass,
        "head_activation": head_activation,
        "channel_activation": channel_activation,
    }
    times = {k: _best(fns[k], reps) for k in only if k in fns}
    sums = {
        "score_heads": ("s", lambda r: r.delta),
        "gradient": ("g", lambda r: r.delta),
        "ablate": ("a", lambda r: r.delta()),
        "wanda": ("w", lambda m: np.asarray([np.asarray(a).sum() for a in jax.tree.leaves(m)])),
        "head_activation": ("h", lambda r: r),
        "channel_activation": ("c", lambda r: r),
    }
    checksums = {k: float(np.abs(get(out[key])).sum()) for k, (key, get) in sums.items() if key in out}
    return {"capjax": capjax.__file__, "checksums": checksums, **times, **cli_times}


def measure_cost() -> dict:
    """XLA cost analysis (flops, bytes accessed) of the forward, generation and scoring kernel."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import capjax
    from capjax.ablation.batch import prepare_batch
    from capjax.attribution import single_head_nll
    from capjax.evaluate.generate import decode_fn
    from capjax.model import Decoder, param_shapes

    config = capjax.load_config("smollm2-135m-instruct")
    model = Decoder(config)
    params = param_shapes(config)

    def cost(lowered):
        c = lowered.compile().cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}

    B, T = 8, 256
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    out = {"forward": cost(jax.jit(model.apply).lower({"params": params}, tokens, attention_mask=tokens))}
    run = decode_fn(config, "float32", 16, (), 0)
    out["generate"] = cost(
        run.lower(params, jax.ShapeDtypeStruct((4, 32), jnp.int32), jax.ShapeDtypeStruct((4, 32), jnp.int32))
    )
    rng = np.random.default_rng(0)
    calib_tokens = rng.integers(0, config.vocab_size, (6, 128)).astype(np.int32)
    loss = np.zeros((6, 128), np.float32)
    loss[:, 96:] = 1
    batch = prepare_batch(model, calib_tokens, loss)
    L = config.num_layers
    out["score"] = cost(
        single_head_nll.lower(model, params, batch.rows, batch.packed_ans, batch.num_examples, 0, L, config.num_heads)
    )
    from capjax.attribution import masked_nll

    masks = jax.ShapeDtypeStruct((8, L, config.num_heads), jnp.float32)
    out["masks"] = cost(masked_nll.lower(model, params, batch.rows, batch.packed_ans, batch.num_examples, masks, 8))
    return {"capjax": capjax.__file__, **out}


def _extract(rev: str, dest: Path) -> Path:
    archive = dest / "tree.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "capjax"], stdout=f, check=True)
    with tarfile.open(archive) as t:
        t.extractall(dest / "tree", filter="data")
    return dest / "tree"


def _run(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        "--n",
        str(args.n),
        "--seq-len",
        str(args.seq_len),
        "--reps",
        str(args.reps),
        "--only",
        ",".join(args.only),
    ]
    res = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench_refactor: the run with PYTHONPATH={tree} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def cost_side_by_side(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": _extract(args.baseline, Path(tmp)), "current": ROOT}
        res = {}
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-cost"]
            r = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"bench_refactor: the cost run with PYTHONPATH={tree} failed:\n{r.stderr[-3000:]}")
            res[name] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"XLA cost analysis, baseline {args.baseline} vs current tree {ROOT} (SmolLM2 shapes, float32)")
    print(f"{'':10s} {'':6s} {'baseline':>14s} {'current':>14s} {'current/baseline':>17s}")
    for k in ("forward", "generate", "score", "masks"):
        for q in ("flops", "bytes"):
            b, c = res["baseline"][k][q], res["current"][k][q]
            print(f"{k:10s} {q:6s} {b:14.6g} {c:14.6g} {c / b:16.6f}x")


def side_by_side(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": _extract(args.baseline, Path(tmp)), "current": ROOT}
        runs: dict[str, list[dict]] = {"baseline": [], "current": []}
        print(
            f"baseline {args.baseline} vs current tree {ROOT}; N={args.n} T={args.seq_len}, "
            f"{args.rounds} rounds, load average at start {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for r in range(args.rounds):
            order = ["baseline", "current"] if r % 2 == 0 else ["current", "baseline"]
            for name in order:
                m = _run(trees[name], args)
                runs[name].append(m)
                print(
                    f"round {r + 1} {name:8s} "
                    + "  ".join(f"{k} {m[k]:9.5f} s" for k in args.only)
                    + "".join(f"  checksum {k} {v:.6f}" for k, v in m["checksums"].items()),
                    flush=True,
                )
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"{'':12s} {'baseline':>10s} {'current':>10s} {'baseline/current':>17s}")
    for k in args.only:
        b = statistics.median(m[k] for m in runs["baseline"])
        c = statistics.median(m[k] for m in runs["current"])
        print(f"{k:12s} {b:9.5f}s {c:9.5f}s {b / c:16.3f}x")
    for k in ("score_heads", "gradient", "ablate", "wanda", "head_activation", "channel_activation"):
        sums = {m["checksums"][k] for ms in runs.values() for m in ms if k in m.get("checksums", {})}
        if sums:  # float32 sums of |delta|: summation order moves the last digits
            same = max(sums) - min(sums) <= 1e-5 * max(sums)
            print(f"{k} checksums: {sorted(sums)} ({'equal within 1e-5 relative' if same else 'DIFFERENT'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="git revision to compare against (e.g. 7e92ba9)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--measure", action="store_true", help="measure the capjax on PYTHONPATH once (JSON line)")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--cost", action="store_true", help="compare XLA cost analysis (flops, bytes), not time")
    p.add_argument("--measure-cost", action="store_true", help="cost analysis of the capjax on PYTHONPATH (JSON)")
    p.add_argument("--only", default=",".join(DEFAULT), help=f"comma-separated subset of {','.join(MEASURES)}")
    args = p.parse_args()
    args.only = tuple(args.only.split(","))
    if not args.only or any(k not in MEASURES for k in args.only):
        p.error(f"--only takes names from {','.join(MEASURES)}")
    if args.measure_cost:
        print(json.dumps(measure_cost()))
    elif args.measure:
        print(json.dumps(measure(args.n, args.seq_len, args.reps, args.only)))
    elif args.baseline and args.cost:
        cost_side_by_side(args)
    elif args.baseline:
        side_by_side(args)
    else:
        p.error("give --baseline REV (side by side) or --measure")


if __name__ == "__main__":
    main()
