"""The recovery loss curve of each pruning method in one figure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def plot_loss_curves(
    histories: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "recovery loss", smooth: int = 1
) -> Path:
    """One line per method: `history["loss"]` [steps] against the step (a running mean over `smooth`
    steps when > 1). Writes `path` (png / pdf / svg by suffix) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not histories:
        raise ValueError("plot_loss_curves needs at least one method's history")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in histories.items():
        loss = np.asarray(h["loss"], np.float64)
        if smooth > 1 and len(loss) >= smooth:
            loss = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")
            steps = np.arange(smooth, len(h["loss"]) + 1)
        else:
            steps = np.arange(1, len(loss) + 1)
        ax.plot(steps, loss, label=f"{name} ({h.get('mode', '?')})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean NLL of loss tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    from capjax.report import save_figure

    return save_figure(fig, path)
