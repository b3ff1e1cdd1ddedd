"""The model organism's problems (capjax.data.organism), generated, disjoint splits by construction."""

from capjax.data.calibration import SYNTHETIC_EVAL_SIZE
from capjax.data.task import Task, register_task
from capjax.data.templates import STEP_BY_STEP

TASK = register_task(
    Task(
        "organism",
        generate="capjax.data.organism:organism_problems",
        calib_split="train",
        eval_split="eval",
        eval_size=SYNTHETIC_EVAL_SIZE,
        instruction=STEP_BY_STEP,
        score="capjax.evaluate.tasks:score_answer",
        answer_loss=True,
        headline=("accuracy_strict", "answer_loss"),
    ),
    _builtin=True,
)
