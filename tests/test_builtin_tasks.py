"""capjax's own tasks are one file each under capjax/data/tasks/, and produce what they produced when
they were declared together in one module (main aca1c0a's capjax/data/builtin_tasks.py): the same
records, prompts, calibration tokens and evaluation fingerprints (scripts/task_digests.py)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
from pathlib import Path

import pytest

from conftest import DATA_DIR, HAS_DATA

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "fixtures" / "task_digests_aca1c0a.json"  # written by aca1c0a's code


def _digests_script():
    spec = importlib.util.spec_from_file_location("task_digests", ROOT / "scripts" / "task_digests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_builtin_task_is_one_module_with_one_register_call():
    import capjax.data.tasks as package
    from capjax.data.task import TASKS

    modules = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    assert TASKS.builtin_names() == tuple(modules)
    for name in modules:
        module = importlib.import_module(f"capjax.data.tasks.{name}")
        assert TASKS[name] is module.TASK and module.TASK.name == name


def test_builtin_tasks_produce_what_they_did_in_one_module(smollm2):
    """Every digest computable here (the data-folder tasks need ../shared/data) equals the one
    aca1c0a's code wrote; prompts and calibration tokens with SmolLM2's tokenizer."""
    from capjax.data.task import TASKS

    golden = json.loads(GOLDEN.read_text())
    assert set(TASKS.builtin_names()) == set(golden)
    tasks = list(golden) if HAS_DATA else ["synthetic", "organism"]  # generated: need no data
    here = _digests_script().task_digests(str(DATA_DIR) if HAS_DATA else None, n=8, tasks=tasks, tokenizer=smollm2[2])
    for task, row in here.items():
        assert row == golden[task], task


def test_missing_files_that_datasets_can_download_are_not_reported(tmp_path, monkeypatch):
    """With `datasets` importable and no --data-dir, only a file the hub cannot stand in for
    (StrategyQA's) is reported missing; GSM8K, ARC (both tasks on its files) and WikiText-2 pass."""
    from capjax.commands import common

    monkeypatch.setenv("CAPJAX_DATA", str(tmp_path))  # an empty data folder
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "datasets" else real(name))
    tasks = ["gsm8k", "arc_challenge", "arc_challenge_cot", "wikitext2", "synthetic"]
    common.check_eval_data(tasks, None)
    with pytest.raises(FileNotFoundError) as e:
        common.check_eval_data([*tasks, "strategyqa"], None)
    assert str(e.value).count(" needs ") == 1 and "strategyqa needs strategyqa/dev.json" in str(e.value)
