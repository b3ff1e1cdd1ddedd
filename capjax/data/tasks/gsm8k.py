"""GSM8K: grade-school word problems, answered by generated chain of thought; calibrates on train."""

from functools import partial

from capjax.data.sources import FILES, load_records
from capjax.data.task import Task, register_task
from capjax.data.templates import STEP_BY_STEP

TASK = register_task(
    Task(
        "gsm8k",
        files=FILES["gsm8k"],
        calib_split="train",
        eval_split="test",
        load=partial(load_records, "gsm8k"),
        instruction=STEP_BY_STEP,
        score="capjax.evaluate.tasks:score_gsm8k",
        headline=("exact_match_strict", "exact_match_flexible"),
    ),
    _builtin=True,
)
