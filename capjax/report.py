"""Reports of a run: the Table-1-shaped markdown table and the figures people look at.

A run's rows are dicts {"name", "method", "calib", "sparsity", "metrics": {"task/metric": value}},
optionally with "achieved_sparsity", "intervals" {"task/metric": {"stderr", "low", "high"}} and
"vs_dense" {"task/metric": {"significant"}} (see capjax.experiment.outputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOWER_IS_BETTER = ("ppl", "loss", "nll")


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def metric_names(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [k for k in r["metrics"] if k not in names]
    return names


def markdown_table(rows: Sequence[dict], relative_to: dict | None = None) -> str:
    """task metrics as columns; one row per (method, calib, sparsity); relative change vs `relative_to`.

    The sparsity column is the achieved sparsity when the rows have it. A metric with an interval
    shows "value ± stderr"; a change against `relative_to` whose paired interval contains zero
    is marked "n.s." (not distinguishable from noise), one that was not tested (too few resamples
    or examples, `capjax.stats.MIN_RESAMPLES`) "no test"."""
    names = metric_names(rows)
    head = ["method", "calib", "sparsity", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r.get("calib") or "-", f"{r.get('achieved_sparsity', r['sparsity']):.2f}"]
        for k in names:
            v = r["metrics"].get(k)
            cell = _fmt(v)
            se = r.get("intervals", {}).get(k, {}).get("stderr")
            if v is not None and se is not None:
                cell += f" ± {se:.3g}"
            base = (relative_to or {}).get("metrics", {}).get(k)
            if r is not relative_to and v is not None and base not in (None, 0):
                diff = r.get("vs_dense", {}).get(k)
                noise = "" if diff is None else {None: ", no test", False: ", n.s."}.get(diff["significant"], "")
                cell += f" ({100 * (v - base) / abs(base):+.1f}%{noise})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Writes a matplotlib figure to `path` (format by suffix) atomically, with the umask's mode,
    and closes it: a full disk leaves no truncated image and names the path."""
    from capjax.artifacts import atomic_write

    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def plot_head_scores(
    delta: np.ndarray, path: str | Path, title: str = "CAP head scores", interval: np.ndarray | None = None
) -> Path:
    """Heatmap of delta [L, H]: layers down, heads across (the paper's Figure 2). With a bootstrap
    interval [2, L, H], a dot marks each head whose interval excludes zero (distinguishable)."""
    plt = _plt()
    L, H = delta.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * H + 2), max(3, 0.22 * L + 1.5)))
    lim = float(np.abs(delta).max()) or 1.0
    im = ax.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    if interval is not None:
        ls, hs = np.nonzero((interval[0] > 0) | (interval[1] < 0))
        ax.scatter(hs, ls, s=6, c="k", marker="o", label="95% interval excludes 0")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.7)
        title += f"\n{len(ls)} of {L * H} heads distinguishable from zero"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="loss increase when ablated")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_metric_curves(rows: Sequence[dict], path: str | Path) -> Path:
    """One panel per metric: value against sparsity, a line per (method, calib), dense as a dashed line."""
    plt = _plt()
    names = metric_names(rows)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    ncol = min(3, max(1, len(names)))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense":
            label = r["method"] + (f" ({r['calib']})" if r.get("calib") else "")
            curves.setdefault(label, []).append(r)
    for ax, name in zip(axes.flat, names):
        for label, rs in curves.items():
            rs = sorted((r for r in rs if r["metrics"].get(name) is not None), key=lambda r: r["sparsity"])
            xs = ([0.0] if dense and dense["metrics"].get(name) is not None else []) + [r["sparsity"] for r in rs]
            ys = ([dense["metrics"][name]] if dense and len(xs) > len(rs) else []) + [r["metrics"][name] for r in rs]
            ax.plot(xs, ys, marker="o", label=label)
        if dense and dense["metrics"].get(name) is not None:
            ax.axhline(dense["metrics"][name], color="gray", ls="--", lw=1, label="dense")
        ax.set_title(name + (" (lower is better)" if name.split("/")[-1] in LOWER_IS_BETTER else ""))
        ax.set_xlabel("sparsity")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_layer_sparsity(per_layer: dict[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: per-layer sparsity [L] for each pruned model (label -> values)."""
    plt = _plt()
    labels = list(per_layer)
    L = len(next(iter(per_layer.values())))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * L * max(1, len(labels)) / 2 + 2), 3.5))
    for i, label in enumerate(labels):
        ax.bar(np.arange(L) + i * width - 0.4 + width / 2, per_layer[label], width, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity")
    ax.set_title(title or "per-layer sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
