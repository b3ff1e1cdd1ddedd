"""Evaluation (and calibration) tasks as objects: one `Task` per task, filed by `register_task`.

A task says everything the library reads about it, so a new task is one file and one register call
(docs/adding_a_task.md): the config's task lists and data checks, `capjax eval --tasks`, the
runner's fingerprints, calibration, templates and the report all read the registry.

    name            what configs and --tasks call it
    mode            "generation" (greedy decoding, then `score` per example), "loglikelihood"
                    (multiple choice: `run`, default `capjax.evaluate.tasks.arc_loglikelihood`), or
                    "perplexity" (`run`, e.g. WikiText-2's windows)
    files           {split: file relative to the data folder} (checked before any compute)
    calib_split     the split calibration draws from (None: not a calibration set)
    eval_split      the held-out split evaluation reads (disjoint from calib_split)
    load            fn(split, data_dir) -> records, the whole split in file order (data-folder tasks)
    generate        fn(n, seed, split) -> records (generated tasks: synthetic, organism)
    eval_size       records a generated task evaluates when no limit is given
    instruction     the chat-mode instruction before the question (capjax.data.templates)
    question        fn(record) -> the question body (default: record["question"])
    answer          fn(record) -> the answer text (default: reasoning, then "The answer is {answer}.")
    score           generation: fn(text, record) -> {metric: float per example}
    run             loglikelihood / perplexity: the evaluation itself (see `capjax.evaluate.tasks`)
    answer_loss     generation: also the teacher-forced answer loss
    headline        the metrics report.md and results.csv show
    settings        the evaluation settings that change its result, so enter its fingerprint
                    (default by mode: generation batch_size, max_new_tokens; loglikelihood
                    batch_size; perplexity ppl_seq_len)

Callables may be "module:function" strings, imported when used (this module imports no jax).
Records have the shape `capjax.data.sources` describes: {"id", "question", "reasoning", "answer"}.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, overload

from capjax.plugins import load_plugins
from capjax.registry import Registry

MODES = ("generation", "loglikelihood", "perplexity")
_SETTINGS = {
    "generation": ("batch_size", "max_new_tokens"),
    "loglikelihood": ("batch_size",),
    "perplexity": ("ppl_seq_len",),
}
SETTINGS = ("batch_size", "max_new_tokens", "ppl_seq_len")  # evaluation settings a task may depend on
Fn = Callable[..., Any] | str


@overload
def resolve(target: None) -> None: ...
@overload
def resolve(target: Fn) -> Callable[..., Any]: ...
def resolve(target: Fn | None) -> Callable[..., Any] | None:
    """A callable, or the function a "module:function" string names (imported now)."""
    if target is None or callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation task; see the module docstring for the fields."""

    name: str
    mode: str = "generation"
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    calib_split: str | None = None
    eval_split: str | None = None
    load: Fn | None = None
    generate: Fn | None = None
    eval_size: int | None = None
    instruction: str = ""
    question: Fn | None = None
    answer: Fn | None = None
    score: Fn | None = None
    run: Fn | None = None
    answer_loss: bool = False
    headline: tuple[str, ...] = ()
    settings: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"task name must be an identifier-like string, got {self.name!r}")
        if self.mode not in MODES:
            raise ValueError(f"{where}: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "generation" and self.score is None:
            raise ValueError(f"{where}: a generation task needs score=fn(text, record) -> {{metric: value}}")
        if self.mode == "perplexity" and self.run is None:
            raise ValueError(
                f"{where}: a perplexity task needs run=fn(model, params, tokenizer, data_dir, seq_len, "
                "limit, progress) -> metrics with window_nll"
            )
        if self.mode != "perplexity" and (self.load is None) == (self.generate is None):
            raise ValueError(
                f"{where}: give exactly one of load=fn(split, data_dir) (data-folder records) or "
                "generate=fn(n, seed, split) (generated records)"
            )
        for split in (self.calib_split, self.eval_split):
            if split is not None and self.load is not None and split not in self.files:
                raise ValueError(f"{where}: split {split!r} has no entry in files ({', '.join(self.files) or 'none'})")
        if self.calib_split is not None and self.calib_split == self.eval_split:
            raise ValueError(
                f"{where}: calib_split and eval_split are both {self.calib_split!r}; evaluation must "
                "read a split calibration never touches"
            )
        bad = [s for s in (self.settings or ()) if s not in SETTINGS]
        if bad:
            raise ValueError(f"{where}: unknown settings {bad}; known: {', '.join(SETTINGS)}")

    @property
    def fingerprint_settings(self) -> tuple[str, ...]:
        """The evaluation settings in this task's fingerprint (`settings`, else its mode's)."""
        return self.settings if self.settings is not None else _SETTINGS[self.mode]

    def file(self, split: str | None) -> str | None:
        """The data file (relative to the data folder) of `split`; None: none (generated records)."""
        return None if split is None else self.files.get(split)

    def records(self, split: str, n: int | None, seed: int, data_dir: Any) -> list[dict]:
        """n records of `split` in a seeded random order; n=None: the whole split in file order
        (a generated task: `eval_size` of them)."""
        if self.generate is not None:
            size = n if n is not None else self.eval_size
            if size is None:
                raise ValueError(f"task {self.name!r}: a generated task needs n, or eval_size")
            return resolve(self.generate)(size, seed, split)
        if self.load is None:
            raise ValueError(f"task {self.name!r} ({self.mode}) has no records")
        records = resolve(self.load)(split, data_dir)
        if n is None:
            return records
        import numpy as np

        if n > len(records):
            raise ValueError(f"requested n={n} examples but {self.name} {split} has only {len(records)}")
        order = np.random.default_rng(seed).permutation(len(records))[:n]
        return [records[i] for i in order]

    def question_text(self, record: dict) -> str:
        return record["question"] if self.question is None else resolve(self.question)(record)

    def answer_text(self, record: dict) -> str:
        """The answer text without the plain-mode leading space."""
        if self.answer is not None:
            return resolve(self.answer)(record)
        final = f"The answer is {record['answer']}."
        return f"{record['reasoning']}\n{final}" if record["reasoning"] else final


# The built-ins are registered by capjax/data/__init__.py (it imports capjax.data.tasks, one module
# per task), which runs before any module of the package: the registry holds them before anyone reads it.
TASKS: Registry[Task] = Registry(
    "task", on_read=load_plugins, unknown="unknown task {name!r}; known tasks: {known} (add one: docs/adding_a_task.md)"
)


def register_task(task: Task, replace: bool = False, _builtin: bool = False) -> Task:
    """Files `task` under its name (a taken name: ValueError unless `replace`); returns it.
    (`_builtin`: capjax's own, in capjax/data/tasks/; they stay when unregistered.)"""
    if not isinstance(task, Task):
        raise ValueError(f"register_task takes a capjax.data.task.Task, got {type(task).__name__}")
    return TASKS.register(task.name, task, replace=replace, builtin=_builtin)


def unregister_task(name: str) -> None:
    """Removes a registered task (tests, or replacing a plugin's); the built-ins stay."""
    TASKS.unregister(name)


def get_task(name: str) -> Task:
    """The Task `name`; an unknown name is a ValueError listing the registered ones."""
    return TASKS.lookup(name)


def task_names() -> tuple[str, ...]:
    """Every evaluation task, built-ins first."""
    return TASKS.names()


def calibration_task_names() -> tuple[str, ...]:
    """The tasks calibration (and recovery data) can draw from: those with a calib_split."""
    return tuple(n for n, t in TASKS.items() if t.calib_split is not None)


__all__ = [
    "MODES",
    "SETTINGS",
    "TASKS",
    "Task",
    "calibration_task_names",
    "get_task",
    "register_task",
    "resolve",
    "task_names",
    "unregister_task",
]
