"""Resumable state on disk: numbered steps of a flat dict of arrays in one folder, through orbax's
`CheckpointManager` (its current `args` API). Used by scoring (`attribution._GroupStore`: one step
per finished layer group, `layers_<start>`) and recovery (`recovery.checkpoint.RecoveryCheckpoints`:
`step_<n>`, the newest KEEP kept).

On disk, per step:
    <folder>/<prefix>_<n>/arrays/                the arrays (an orbax PyTree item)
    <folder>/<prefix>_<n>/_CHECKPOINT_METADATA   orbax's step metadata; its custom_metadata holds
                                                 {"code": capjax.provenance.code_version()}
Atomic: orbax writes a step under `<prefix>_<n>.orbax-checkpoint-tmp-<t>` and renames it when every
file is written, so the stamp and the numbers are committed together. A folder left under its
temporary name (a killed save) is never listed or restored, and is removed when the folder is next
opened. Retention (`keep`) is orbax's `max_to_keep`: the newest steps survive.

Old layout (capjax before this module, orbax's legacy PyTreeCheckpointer): the arrays directly in the
step folder (`<prefix>_<n>/_METADATA`) and the code stamp in a file beside it (`<prefix>_<n>.code`).
Such a folder is refused with one line (ArtifactError) naming it and the fix; `clear=True` (what
`score_heads(resume=False)` / `capjax run --recompute` pass) deletes its steps instead.

Every function here is collective under multi-process JAX (orbax synchronises the processes and
writes each file once); all arrays are restored as host numpy arrays on every process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from capjax.errors import ArtifactError

ITEM = "arrays"  # the one item of a step


def old_layout(folder: str | Path, prefix: str) -> list[Path]:
    """The entries of `folder` in the layout of capjax before `CheckpointManager`: step folders
    holding a PyTree checkpoint directly (`_METADATA`), and `.code` stamp files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    step = re.compile(rf"{re.escape(prefix)}_\d+")
    return sorted(
        p
        for p in folder.iterdir()
        if step.fullmatch(p.name.removesuffix(".code")) and (p.name.endswith(".code") or (p / "_METADATA").exists())
    )


class Checkpoints:
    """The steps `<prefix>_<n>` (n padded to `digits`) under `folder`, each stamped with `code`;
    `keep` newest kept (None: all). See the module docstring for the layout and its guarantees."""

    def __init__(
        self,
        folder: str | Path,
        prefix: str,
        *,
        code: str,
        digits: int = 7,
        keep: int | None = None,
        clear: bool = False,
        fix: str = "delete it",
    ):
        import orbax.checkpoint as ocp

        self.folder = Path(folder).absolute()
        self.prefix, self.digits, self.code = prefix, digits, code
        old = old_layout(self.folder, prefix)
        if old and not clear:
            raise ArtifactError(
                f"{self.folder} holds checkpoints in capjax's old layout ({old[0].name}, orbax's "
                f"legacy PyTreeCheckpointer) that this capjax does not read: {fix}"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            step_prefix=prefix,
            step_format_fixed_length=digits,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
            save_root_metadata=False,
        )
        registry = ocp.handlers.create_default_handler_registry(**{ITEM: ocp.PyTreeCheckpointHandler()})
        self._manager = ocp.CheckpointManager(self.folder, options=options, handler_registry=registry)
        if clear:
            if ocp.multihost.process_index() == 0:
                for p in old:
                    if p.is_file():
                        p.unlink(missing_ok=True)
            self.clear()

    # ------------------------------------------------------------------ reading
    def steps(self) -> list[int]:
        """The complete steps, oldest first."""
        return sorted(self._manager.all_steps())

    def path(self, step: int) -> Path:
        return self.folder / f"{self.prefix}_{step:0{self.digits}d}"

    def code_of(self, step: int) -> str | None:
        """The code version that wrote `step` (None when it records none)."""
        custom = self._manager.metadata(step).custom_metadata or {}
        return custom.get("code")

    def restore(self, step: int) -> dict[str, np.ndarray]:
        """The arrays of `step`, as host numpy arrays on every process, whatever shardings (and
        device ids) they were saved with."""
        import jax
        import orbax.checkpoint as ocp

        tree = self._manager.metadata(step).item_metadata[ITEM].tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeRestore(restore_args=args)})
        )
        return dict(restored[ITEM])

    # ------------------------------------------------------------------ writing
    def save(self, step: int, arrays: Mapping[str, Any]) -> Path:
        """Writes `step` (replacing a step of that number), stamped with the code; older steps
        beyond `keep` are deleted after it is complete."""
        import orbax.checkpoint as ocp

        if step in self._manager.all_steps():
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeSave(dict(arrays))}),
            custom_metadata={"code": self.code},
            force=True,
        )
        return self.path(step)

    def clear(self) -> None:
        """Deletes every step."""
        for step in self.steps():
            self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def restore_numpy(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one step folder (`.../<prefix>_<n>`) as host numpy arrays on every process."""
    path = Path(path).absolute()
    m = re.fullmatch(r"(.+)_(\d+)", path.name)
    if m is None or not path.is_dir():
        raise ArtifactError(f"{path} is not a checkpoint step folder (<prefix>_<number>)")
    prefix, number = m.groups()
    ckpt = Checkpoints(path.parent, prefix, code="", digits=len(number))
    try:
        return ckpt.restore(int(number))
    finally:
        ckpt.close()


__all__ = ["ITEM", "Checkpoints", "old_layout", "restore_numpy"]
