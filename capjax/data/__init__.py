"""Calibration and evaluation data for Causal Attribution Pruning.

``task`` holds the task registry (one ``Task`` per task; the built-ins in ``tasks/``, one module each),
``sources`` reads raw benchmark records, ``synthetic`` generates arithmetic word problems,
``templates`` turns records into (prompt, answer) text, and ``calibration`` tokenizes them into
[N, T] arrays.
"""

import capjax.data.tasks  # noqa: F401  (registers the built-in tasks, one module each; see capjax.data.task)
from capjax.data.calibration import CalibrationBatch, build_calibration, eval_records
from capjax.data.sources import TASKS, load_records, load_wikitext2_text, resolve_data_dir
from capjax.data.synthetic import synthetic_problems
from capjax.data.task import Task, calibration_task_names, get_task, register_task, task_names, unregister_task
from capjax.data.templates import build_prompt, format_example, use_chat


def __getattr__(name: str):
    # Read from the task registry when asked (so registered tasks are in them): {task: split / instruction}.
    from capjax.data.task import TASKS as REGISTRY

    if name == "CALIB_SPLITS":
        return {n: REGISTRY[n].calib_split for n in calibration_task_names()}
    if name == "EVAL_SPLITS":
        return {n: REGISTRY[n].eval_split for n in calibration_task_names()}
    if name == "INSTRUCTIONS":
        return {n: REGISTRY[n].instruction for n in task_names() if REGISTRY[n].instruction}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CALIB_SPLITS",
    "EVAL_SPLITS",
    "INSTRUCTIONS",
    "TASKS",
    "CalibrationBatch",
    "Task",
    "build_calibration",
    "build_prompt",
    "calibration_task_names",
    "eval_records",
    "format_example",
    "get_task",
    "load_records",
    "load_wikitext2_text",
    "register_task",
    "resolve_data_dir",
    "synthetic_problems",
    "task_names",
    "unregister_task",
    "use_chat",
]
