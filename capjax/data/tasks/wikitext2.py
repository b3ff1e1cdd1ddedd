"""WikiText-2: perplexity over the windows of its test file (no calibration split)."""

from capjax.data.sources import WIKITEXT2_FILE
from capjax.data.task import Task, register_task

TASK = register_task(
    Task(
        "wikitext2",
        mode="perplexity",
        files={"test": WIKITEXT2_FILE},
        eval_split="test",
        run="capjax.evaluate.tasks:wikitext2_task",
        headline=("ppl",),
    ),
    _builtin=True,
)
