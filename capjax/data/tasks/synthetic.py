"""Synthetic arithmetic word problems (capjax.data.synthetic), generated: calibration and evaluation
draw disjoint splits by construction, so no data folder is needed."""

from capjax.data.calibration import SYNTHETIC_EVAL_SIZE
from capjax.data.task import Task, register_task
from capjax.data.templates import STEP_BY_STEP

TASK = register_task(
    Task(
        "synthetic",
        generate="capjax.data.synthetic:synthetic_problems",
        calib_split="calib",
        eval_split="eval",
        eval_size=SYNTHETIC_EVAL_SIZE,
        instruction=STEP_BY_STEP,
        score="capjax.evaluate.tasks:score_answer",
        answer_loss=True,
        headline=("accuracy_flexible", "answer_loss"),
    ),
    _builtin=True,
)
