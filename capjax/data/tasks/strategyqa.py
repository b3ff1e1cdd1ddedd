"""StrategyQA: yes/no questions, answered by generated chain of thought; evaluates on dev (it has no
labelled test split)."""

from functools import partial

from capjax.data.sources import FILES, load_records
from capjax.data.task import Task, register_task

TASK = register_task(
    Task(
        "strategyqa",
        files=FILES["strategyqa"],
        calib_split="train",
        eval_split="dev",
        load=partial(load_records, "strategyqa"),
        instruction="Answer the yes/no question. Reason step by step and end with 'The answer is yes.' or "
        "'The answer is no.'",
        score="capjax.evaluate.tasks:score_strategyqa",
        headline=("accuracy",),
    ),
    _builtin=True,
)
