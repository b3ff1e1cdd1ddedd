"""Checkpoints of a recovery run's state under dir/<fingerprint>/step_<n> (`capjax.checkpoints`:
orbax's CheckpointManager, atomic steps, the newest KEEP kept, each stamped with the code version).

The state (trainable params, optimizer state, step, RNG key, per-step losses) is saved as its
flat list of leaves; a restore unflattens them into the structure of a freshly built state, so
optax's named tuples and None leaves need no orbax type handling. A checkpoint is only written
after a step whose loss and gradient were finite, so the newest one is always a good one. Steps
written by other capjax code are not resumed: a warning line, and the run starts over (its steps
are replaced). A folder in the layout of capjax before CheckpointManager is refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from capjax.checkpoints import Checkpoints

KEEP = 2  # newest checkpoints kept per run


class RecoveryCheckpoints:
    """Save / find / restore the state of one run (one fingerprint)."""

    def __init__(self, root: str | Path, fingerprint: str):
        from capjax.provenance import code_version

        self.dir = (Path(root) / fingerprint).absolute()
        self.ckpt = Checkpoints(
            self.dir,
            "step",
            code=code_version(),
            keep=KEEP,
            fix="delete the folder (capjax run --recompute deletes it)",
        )

    def _path(self, step: int) -> Path:
        return self.ckpt.path(step)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (orbax writes to a temporary name first)."""
        return self.ckpt.steps()

    def latest(self) -> Path | None:
        s = self.steps()
        return self._path(s[-1]) if s else None

    def save(self, step: int, state: Any) -> Path:
        leaves = jax.tree.leaves(state)
        return self.ckpt.save(step, {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})

    def restore(self, template: Any) -> tuple[int, Any] | None:
        """(step, state shaped like `template`, each leaf placed like the template's) or None."""
        s = self.steps()
        if not s:
            return None
        code = self.ckpt.code_of(s[-1])
        if code != self.ckpt.code:
            from capjax.artifacts import warn

            warn(
                f"{self._path(s[-1])} was written by capjax {code or 'of an unrecorded version'} (this is "
                f"{self.ckpt.code}); recovery starts over from step 0"
            )
            self.ckpt.clear()
            return None
        flat = self.ckpt.restore(s[-1])
        leaves, treedef = jax.tree.flatten(template)
        if len(flat) != len(leaves):
            raise ValueError(
                f"checkpoint {self._path(s[-1])} has {len(flat)} arrays, the run's state has "
                f"{len(leaves)}: delete the folder to start over"
            )
        out = [
            jax.device_put(np.asarray(flat[f"leaf_{i:05d}"]).astype(t.dtype), t.sharding) for i, t in enumerate(leaves)
        ]
        return s[-1], jax.tree.unflatten(treedef, out)

    def close(self) -> None:
        self.ckpt.close()
