"""Side by side: the checkpoint writes and reads of capjax before and after capjax.checkpoints.

before: orbax's legacy PyTreeCheckpointer, one folder per step, retention by rmtree (what
        recovery/checkpoint.py and attribution._GroupStore did), plus a .code stamp file for groups
after:  capjax.checkpoints.Checkpoints (orbax CheckpointManager, synchronous, code in the step metadata)

Two workloads, interleaved (before, after, before, ...) so that machine load hits both alike:
  recovery: a state of --leaves float32 arrays of --size elements each, saved every step, KEEP=2 kept,
            then the newest restored
  scoring:  --groups layer groups of float64 [1, H, N] losses saved, then each restored
Prints the median seconds per workload and the ratio after / before.

    python scripts/bench_checkpoints.py --reps 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def before_recovery(root: Path, states: list[dict], keep: int) -> dict:
    import orbax.checkpoint as ocp

    ckpt = ocp.PyTreeCheckpointer()
    for step, state in enumerate(states, 1):
        ckpt.save(root / f"step_{step:07d}", state, force=True)
        steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit())
        for old in steps[:-keep]:
            shutil.rmtree(root / f"step_{old:07d}", ignore_errors=True)
    return ckpt.restore(root / f"step_{len(states):07d}")


def after_recovery(root: Path, states: list[dict], keep: int) -> dict:
    from capjax.checkpoints import Checkpoints

    with Checkpoints(root, "step", code="bench", keep=keep) as ckpt:
        for step, state in enumerate(states, 1):
            ckpt.save(step, state)
    with Checkpoints(root, "step", code="bench", keep=keep) as ckpt:  # a resumed run opens the folder anew
        return ckpt.restore(ckpt.steps()[-1])


def before_scoring(root: Path, groups: list[np.ndarray]) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    ckpt = ocp.PyTreeCheckpointer()
    for start, nll in enumerate(groups):
        (root / f"layers_{start:04d}.code").unlink(missing_ok=True)
        ckpt.save(root / f"layers_{start:04d}", {"nll": nll}, force=True)
        (root / f"layers_{start:04d}.code").write_text("bench\n")
    return [
        np.asarray(ckpt.restore(root / f"layers_{s:04d}")["nll"])
        for s in range(len(groups))
        if (root / f"layers_{s:04d}.code").read_text().strip() == "bench"
    ]


def after_scoring(root: Path, groups: list[np.ndarray]) -> list[np.ndarray]:
    from capjax.checkpoints import Checkpoints

    with Checkpoints(root, "layers", code="bench", digits=4) as ckpt:
        for start, nll in enumerate(groups):
            ckpt.save(start, {"nll": nll})
    with Checkpoints(root, "layers", code="bench", digits=4) as ckpt:
        return [ckpt.restore(s)["nll"] for s in ckpt.steps() if ckpt.code_of(s) == "bench"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="recovery checkpoints written per repetition")
    ap.add_argument("--leaves", type=int, default=30)
    ap.add_argument("--size", type=int, default=200_000, help="elements per leaf")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--examples", type=int, default=512)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    states = [
        {f"leaf_{i:05d}": rng.standard_normal(a.size, dtype=np.float32) for i in range(a.leaves)}
        for _ in range(a.steps)
    ]
    groups = [rng.standard_normal((1, a.heads, a.examples)) for _ in range(a.groups)]
    runs = {
        "recovery": (before_recovery, after_recovery, (states, 2)),
        "scoring": (before_scoring, after_scoring, (groups,)),
    }
    mib = a.leaves * a.size * 4 / 2**20
    print(f"recovery: {a.steps} saves of {a.leaves} x {a.size} float32 ({mib:.1f} MiB each), keep 2, then a restore")
    print(f"scoring: {a.groups} groups of [1, {a.heads}, {a.examples}] float64 saved, then each restored")
    for name, (before, after, args) in runs.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(a.reps):
            for label, fn in (("before", before), ("after", after)):
                root = Path(tempfile.mkdtemp(prefix=f"bench_ckpt_{label}_"))
                t = time.perf_counter()
                out = fn(root, *args)
                times[label].append(time.perf_counter() - t)
                want = args[0][-1] if name == "recovery" else args[0]
                got = out if name == "recovery" else out
                if name == "recovery":
                    assert all(np.array_equal(got[k], want[k]) for k in want), label
                else:
                    assert all(np.array_equal(g, w) for g, w in zip(got, want)) and len(got) == len(want), label
                shutil.rmtree(root)
        b, f = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"{name}: before {b:.3f} s, after {f:.3f} s (median of {a.reps}), after / before = {f / b:.2f}")


if __name__ == "__main__":
    main()
