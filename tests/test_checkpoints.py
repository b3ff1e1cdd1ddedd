"""capjax.checkpoints (orbax CheckpointManager): retention, atomic steps, the code stamp, and
the refusal of the old layout (capjax before CheckpointManager: orbax's legacy PyTreeCheckpointer
writing the arrays straight into the step folder, the code stamp in a `.code` file beside it)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capjax import attribution, provenance
from capjax.checkpoints import Checkpoints, old_layout, restore_numpy
from capjax.errors import ArtifactError
from capjax.recovery.checkpoint import KEEP, RecoveryCheckpoints


def _arrays(step: int) -> dict[str, np.ndarray]:
    return {"nll": np.arange(6, dtype=np.float64).reshape(1, 2, 3) * step, "count": np.asarray(step, np.int32)}


def _write_old_layout(folder: Path, name: str, arrays: dict[str, np.ndarray], code: str | None = None) -> None:
    """What capjax before CheckpointManager wrote: PyTreeCheckpointer().save(<folder>/<name>, arrays)
    and, for scoring groups, the code stamp in <name>.code."""
    folder.mkdir(parents=True, exist_ok=True)
    ocp.PyTreeCheckpointer().save((folder / name).absolute(), arrays, force=True)
    if code is not None:
        (folder / f"{name}.code").write_text(code + "\n")


def test_retention_keeps_the_newest_steps_and_each_restores_its_own_arrays(tmp_path):
    ckpt = Checkpoints(tmp_path / "run", "step", code="v", keep=2)
    for step in range(1, 6):
        ckpt.save(step, _arrays(step))
    assert ckpt.steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_0000004", "step_0000005"]
    for step in (4, 5):
        got = Checkpoints(tmp_path / "run", "step", code="v", keep=2).restore(step)  # a fresh manager reads them
        np.testing.assert_array_equal(got["nll"], _arrays(step)["nll"])
        assert got["count"] == step and got["nll"].dtype == np.float64 and isinstance(got["nll"], np.ndarray)
    # recovery keeps KEEP steps of its state
    store = RecoveryCheckpoints(tmp_path / "rec", "fp")
    for step in range(1, KEEP + 3):
        store.save(step, {"w": jnp.full((2,), float(step)), "opt": (jnp.zeros(()), None)})
    assert store.steps() == list(range(3, KEEP + 3))
    step, state = store.restore({"w": jnp.zeros((2,)), "opt": (jnp.ones(()), None)})
    assert step == KEEP + 2 and state["w"].tolist() == [KEEP + 2.0] * 2 and state["opt"][1] is None


def test_a_step_killed_before_its_commit_is_never_restored(tmp_path, monkeypatch):
    """A save killed after writing its files but before orbax's rename leaves <step>.orbax-checkpoint-tmp:
    it is not listed, the newest complete step is restored, and reopening the folder removes the leftover."""
    from orbax.checkpoint._src.path import atomicity

    ckpt = Checkpoints(tmp_path, "step", code="v")
    ckpt.save(1, _arrays(1))

    class Killed(BaseException):
        pass

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed(self):  # the step's rename (the commit) is killed; its item's rename went through
        if self.get_final().name == "step_0000002":
            raise Killed
        return await finalize(self)

    with monkeypatch.context() as m:
        m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
        with pytest.raises(Killed):
            ckpt.save(2, _arrays(2))
    [tmp] = [p for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert tmp.name.startswith("step_0000002") and (tmp / "arrays").is_dir()  # the data are there, uncommitted
    again = Checkpoints(tmp_path, "step", code="v")  # the rerun
    assert again.steps() == [1]
    np.testing.assert_array_equal(again.restore(1)["nll"], _arrays(1)["nll"])
    again.save(3, _arrays(3))  # opening the folder cleared the leftover (orbax's cleanup_tmp_directories)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001", "step_0000003"]


def test_each_step_is_stamped_with_its_code_and_a_save_replaces_a_step(tmp_path):
    Checkpoints(tmp_path, "layers", code="0.1.0+gaaaa", digits=4).save(0, _arrays(1))
    ckpt = Checkpoints(tmp_path, "layers", code="0.1.0+gbbbb", digits=4)
    assert ckpt.code_of(0) == "0.1.0+gaaaa"
    ckpt.save(0, _arrays(3))  # recomputed by this code: replaced, not refused
    fresh = Checkpoints(tmp_path, "layers", code="0.1.0+gbbbb", digits=4)
    assert fresh.steps() == [0] and fresh.code_of(0) == "0.1.0+gbbbb"
    np.testing.assert_array_equal(restore_numpy(tmp_path / "layers_0000")["nll"], _arrays(3)["nll"])


def test_recovery_state_of_other_code_starts_over(tmp_path, monkeypatch, capsys):
    template = {"w": jnp.zeros((2,))}
    with monkeypatch.context() as m:
        m.setattr(provenance, "code_version", lambda: "0.0.1+gdeadbeef")
        RecoveryCheckpoints(tmp_path, "fp").save(3, {"w": jnp.ones((2,))})
    store = RecoveryCheckpoints(tmp_path, "fp")
    assert store.restore(template) is None and store.steps() == []
    assert "written by capjax 0.0.1+gdeadbeef" in capsys.readouterr().err


def test_old_layout_is_refused_in_one_line_naming_the_folder_and_the_fix(tmp_path):
    rec, scores = tmp_path / "recovery" / "fp", tmp_path / "scores" / "fp"
    for step in (1, 2):
        _write_old_layout(rec, f"step_{step:07d}", {"leaf_00000": np.ones(3) * step})
    _write_old_layout(scores, "layers_0000", {"nll": np.ones((1, 2, 3))}, code=provenance.code_version())
    assert [p.name for p in old_layout(rec, "step")] == ["step_0000001", "step_0000002"]
    assert [p.name for p in old_layout(scores, "layers")] == ["layers_0000", "layers_0000.code"]

    with pytest.raises(ArtifactError) as e:
        RecoveryCheckpoints(tmp_path / "recovery", "fp")
    msg = str(e.value)
    assert "\n" not in msg and str(rec) in msg and "old layout" in msg and "delete the folder" in msg
    with pytest.raises(ArtifactError) as e:
        attribution._GroupStore(tmp_path / "scores", "fp")
    msg = str(e.value)
    assert "\n" not in msg and str(scores) in msg and "--recompute" in msg
    # resume=False (--recompute) deletes the old groups and their stamps, and works
    store = attribution._GroupStore(tmp_path / "scores", "fp", resume=False)
    assert list(scores.iterdir()) == [] and old_layout(scores, "layers") == []
    store.save(0, np.full((1, 2, 3), 7.0))
    np.testing.assert_array_equal(attribution._GroupStore(tmp_path / "scores", "fp").load(0), np.full((1, 2, 3), 7.0))
    # the new layout is not mistaken for the old one
    assert old_layout(scores, "layers") == []
