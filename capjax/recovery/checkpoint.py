"""Orbax checkpoints of a recovery run's state under dir/<fingerprint>/step_<n>.

The state (trainable params, optimizer state, step, RNG key, per-step losses) is saved as its
flat list of leaves; a restore unflattens them into the structure of a freshly built state, so
optax's named tuples and None leaves need no orbax type handling. A checkpoint is only written
after a step whose loss and gradient were finite, so the newest one is always a good one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

KEEP = 2  # newest checkpoints kept per run


class RecoveryCheckpoints:
    """Save / find / restore the state of one run (one fingerprint)."""

    def __init__(self, root: str | Path, fingerprint: str):
        import orbax.checkpoint as ocp

        self.dir = (Path(root) / fingerprint).absolute()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = ocp.PyTreeCheckpointer()

    def _path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (orbax writes to a temporary name first)."""
        return sorted(int(p.name[5:]) for p in self.dir.glob("step_*") if p.name[5:].isdigit())

    def latest(self) -> Path | None:
        s = self.steps()
        return self._path(s[-1]) if s else None

    def save(self, step: int, state: Any) -> Path:
        leaves = jax.tree.leaves(state)
        path = self._path(step)
        self.ckpt.save(path, {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}, force=True)
        for old in self.steps()[:-KEEP]:
            shutil.rmtree(self._path(old), ignore_errors=True)
        return path

    def restore(self, template: Any) -> tuple[int, Any] | None:
        """(step, state shaped like `template`, each leaf placed like the template's) or None."""
        s = self.steps()
        if not s:
            return None
        flat = self.ckpt.restore(self._path(s[-1]))
        leaves, treedef = jax.tree.flatten(template)
        if len(flat) != len(leaves):
            raise ValueError(f"checkpoint {self._path(s[-1])} has {len(flat)} arrays, the run's state has "
                             f"{len(leaves)}: delete the folder to start over")
        out = [jax.device_put(np.asarray(flat[f"leaf_{i:05d}"]).astype(t.dtype), t.sharding)
               for i, t in enumerate(leaves)]
        return s[-1], jax.tree.unflatten(treedef, out)
