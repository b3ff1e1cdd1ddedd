"""ARC-Challenge answered by generated chain of thought: ARC's records and prompts, scored on the
label the text ends with (not a calibration set of its own)."""

import dataclasses

from capjax.data.task import register_task
from capjax.data.tasks.arc_challenge import TASK as ARC

TASK = register_task(
    dataclasses.replace(
        ARC,
        name="arc_challenge_cot",
        mode="generation",
        calib_split=None,
        run=None,
        score="capjax.evaluate.tasks:score_arc_cot",
        headline=("accuracy",),
    ),
    _builtin=True,
)
