"""Structured compression, measured: dense SmolLM2-135M-Instruct vs the same model with 25% and 50%
of its decoder-layer parameters removed structurally (heads, MLP channels), in transformers
(PyTorch, CPU) and in capjax, side by side in one run.

Per model and framework, one fresh subprocess (so peak memory is its own): load the exported HF
folder, forward latency on a [4, 256] batch (median of --reps after a warm-up; capjax jitted),
greedy tokens/s (batch 1, 16-token prompt, --new-tokens new tokens, no EOS stop; capjax's first
call compiles and is not timed) and the process's peak resident memory (VmHWM: it includes the
framework's own footprint). Each framework runs on one thread (torch.set_num_threads(1), XLA's
single-threaded Eigen), since the machine's cores are shared; --rounds rounds run in alternating
order and each cell keeps its best round. Parameters and file sizes come from the written folders.

The shapes are `budget_shape(config, 0.75 / 0.5)` (heads and MLP channels removed alike). Which
heads / channels are kept does not change speed or size, so this script keeps the first ones
(no scoring); quality is a separate measurement.

    nice -n 10 python scripts/bench_structured.py [--reps 5] [--new-tokens 32] [--rounds 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B, T, PROMPT = 4, 256, 16


def worker(framework: str, folder: str, reps: int, new_tokens: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (B, T))
    prompt = rng.integers(0, 1000, (1, PROMPT))
    t0 = time.perf_counter()
    if framework == "torch":
        import torch
        import transformers

        torch.set_num_threads(1)  # one thread per framework (XLA_FLAGS below): stable on a shared machine
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        load_s = time.perf_counter() - t0
        x = torch.as_tensor(tokens)

        def forward():
            with torch.inference_mode():
                model(x)

        def greedy():
            with torch.inference_mode():
                out = model.generate(
                    torch.as_tensor(prompt),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            assert out.shape[1] == PROMPT + new_tokens
    else:
        import jax
        import jax.numpy as jnp

        import capjax

        model, params = capjax.load_pretrained(folder)
        load_s = time.perf_counter() - t0
        apply = jax.jit(model.apply)
        x = jnp.asarray(tokens, jnp.int32)

        def forward():
            apply({"params": params}, x).block_until_ready()

        def greedy():
            out = capjax.generate(model, params, [prompt[0].tolist()], new_tokens, batch_size=1, eos_ids=[])
            assert len(out[0]) == new_tokens

    forward()  # warm-up (capjax: compilation)
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        forward()
        times.append(time.perf_counter() - s)
    greedy()  # warm-up (capjax: compilation)
    rates = []
    for _ in range(max(1, reps // 2)):
        s = time.perf_counter()
        greedy()
        rates.append(new_tokens / (time.perf_counter() - s))
    return {
        "load_s": load_s,
        "forward_ms": 1000 * statistics.median(times),
        "greedy_tok_s": statistics.median(rates),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss, which a child
    inherits from the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run_worker(framework: str, folder: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        framework,
        str(folder),
        "--reps",
        str(args.reps),
        "--new-tokens",
        str(args.new_tokens),
    ]
    env = dict(
        os.environ,
        JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
        OMP_NUM_THREADS="1",
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker on {folder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_lines(rows: list[dict]) -> list[str]:
    """The markdown table (header, separator, a row per model and framework) of the measured rows
    (also those saved in bench_structured.json); the first row is the dense model."""
    dense = rows[0]
    head = (
        "| model | L, H, K, F | params (layers) | file MB | framework | forward ms | x | greedy tok/s | x | "
        "peak RSS MB | x |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        for fw in ("torch", "capjax"):
            m, d = r[fw], dense[fw]
            lines.append(
                f"| {r['model']} | {', '.join(map(str, r['shape']))} | {r['params'] / 1e6:.1f}M "
                f"({r['layer_params'] / 1e6:.1f}M, {r['layer_params'] / dense['layer_params']:.0%}) | "
                f"{r['file_mb']:.0f} ({r['file_mb'] / dense['file_mb']:.0%}) | {fw} | {m['forward_ms']:.0f} | "
                f"{d['forward_ms'] / m['forward_ms']:.2f}x | {m['greedy_tok_s']:.1f} | "
                f"{m['greedy_tok_s'] / d['greedy_tok_s']:.2f}x | {m['peak_rss_mb']:.0f} | "
                f"{m['peak_rss_mb'] / d['peak_rss_mb']:.0%} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="measurement rounds (alternating order)")
    parser.add_argument("--out", default=None, help="folder for the exported models (default: a temp folder)")
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.reps, args.new_tokens)))
        return

    import capjax
    from capjax.structured import budget_shape, choose, shrink
    from capjax.structured.plan import layer_params

    root = Path(args.out or tempfile.mkdtemp(prefix="bench_structured_"))
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tokenizer = capjax.load_tokenizer("smollm2-135m-instruct")
    c = model.config
    variants = {"dense": (model, params)}
    for name, keep in (("structured 25%", 0.75), ("structured 50%", 0.5)):
        shape = budget_shape(c, keep)
        print(f"{name}: {shape.describe(c)}", flush=True)
        variants[name] = shrink(model, params, choose(c, shape))
    rows, folders = [], {}
    for name, (m, p) in variants.items():
        folder = folders[name] = root / name.replace(" ", "_").replace("%", "")
        capjax.save_pretrained(m, p, folder, tokenizer)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows.append(
            {
                "model": name,
                "shape": (m.config.num_layers, m.config.num_heads, m.config.num_kv_heads, m.config.intermediate_size),
                "params": m.config.num_params(),
                "layer_params": layer_params(m.config),
                "file_mb": size / 2**20,
                "rounds": {"torch": [], "capjax": []},
            }
        )
    del variants, model, params
    # Rounds in alternating order (load on a shared machine drifts); each cell keeps its best round.
    cells = [(r, fw) for r in rows for fw in ("torch", "capjax")]
    for k in range(args.rounds):
        for r, fw in cells if k % 2 == 0 else cells[::-1]:
            print(f"round {k + 1}: measuring {r['model']} in {fw} ...", flush=True)
            r["rounds"][fw].append(_run_worker(fw, folders[r["model"]], args))
    for r in rows:
        for fw, runs in r["rounds"].items():
            r[fw] = {
                "forward_ms": min(x["forward_ms"] for x in runs),
                "greedy_tok_s": max(x["greedy_tok_s"] for x in runs),
                "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
            }
    print(
        f"\nSmolLM2-135M-Instruct, float32, CPU, one thread per framework ({os.cpu_count()} cores on the machine), "
        f"forward [{B}, {T}] (median of {args.reps}), greedy batch 1 ({args.new_tokens} new tokens), best of "
        f"{args.rounds} rounds; x = speed-up over dense in the same framework, % = of dense\n"
    )
    print("\n".join(table_lines(rows)))
    (root / "bench_structured.json").write_text(json.dumps(rows, indent=2))
    print(f"\nraw numbers: {root / 'bench_structured.json'}")


if __name__ == "__main__":
    main()
