"""capjax's own tasks, each one `Task` (capjax.data.task) and one register call, as a user's would be.

    task               mode           calibration   evaluation   data
    wikitext2          perplexity     -             test         wikitext2/wiki.test.raw
    gsm8k              generation     train         test         gsm8k/
    strategyqa         generation     train         dev          strategyqa/
    arc_challenge      loglikelihood  train         test         arc_challenge/
    arc_challenge_cot  generation     train         test         arc_challenge/ (ARC's records, CoT answers)
    synthetic          generation     "calib"       "eval"       generated (disjoint by construction)
    organism           generation     "train"       "eval"       generated (disjoint by construction)

The evaluation code they name ("module:function") is imported only when a task runs.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from capjax.data.calibration import SYNTHETIC_EVAL_SIZE
from capjax.data.sources import FILES, WIKITEXT2_FILE, load_records
from capjax.data.task import TASKS, Task

_E = "capjax.evaluate.tasks:"
_STEP_BY_STEP = "Solve the problem step by step and end with 'The answer is N.'"


def _arc_question(record: dict) -> str:
    """The stem, then one line per choice, "{label}. {text}", with the labels as given."""
    return "\n".join([record["question"]] + [f"{label}. {text}" for label, text in record["choices"]])


def _arc_answer(record: dict) -> str:
    return f"The answer is {record['answer_label']}."  # ARC ships no chain of thought


def _generated(kind: str, n: int, seed: int, split: str) -> list[dict]:
    if kind == "synthetic":
        from capjax.data.synthetic import synthetic_problems

        return synthetic_problems(n, seed, split)
    from capjax.data.organism import organism_problems

    return organism_problems(n, seed, split)


def _dataset(name: str, split: str, data_dir) -> list[dict]:
    return load_records(name, split, data_dir)


ARC = Task(
    "arc_challenge",
    mode="loglikelihood",
    files=FILES["arc_challenge"],
    calib_split="train",
    eval_split="test",
    load=partial(_dataset, "arc_challenge"),
    instruction="Choose the correct option. End with 'The answer is X.' where X is the label of the option.",
    question=_arc_question,
    answer=_arc_answer,
    run=_E + "arc_task",
    headline=("acc", "acc_norm"),
)

BUILTIN: tuple[Task, ...] = (
    Task(
        "wikitext2",
        mode="perplexity",
        files={"test": WIKITEXT2_FILE},
        eval_split="test",
        run=_E + "wikitext2_task",
        headline=("ppl",),
    ),
    Task(
        "gsm8k",
        files=FILES["gsm8k"],
        calib_split="train",
        eval_split="test",
        load=partial(_dataset, "gsm8k"),
        instruction=_STEP_BY_STEP,
        score=_E + "score_gsm8k",
        headline=("exact_match_strict", "exact_match_flexible"),
    ),
    Task(
        "strategyqa",
        files=FILES["strategyqa"],
        calib_split="train",
        eval_split="dev",
        load=partial(_dataset, "strategyqa"),
        instruction="Answer the yes/no question. Reason step by step and end with 'The answer is yes.' or "
        "'The answer is no.'",
        score=_E + "score_strategyqa",
        headline=("accuracy",),
    ),
    ARC,
    # ARC's records and prompts, answered by generated chain of thought (not a calibration set of its own)
    dataclasses.replace(
        ARC,
        name="arc_challenge_cot",
        mode="generation",
        calib_split=None,
        run=None,
        score=_E + "score_arc_cot",
        headline=("accuracy",),
    ),
    Task(
        "synthetic",
        generate=partial(_generated, "synthetic"),
        calib_split="calib",
        eval_split="eval",
        eval_size=SYNTHETIC_EVAL_SIZE,
        instruction=_STEP_BY_STEP,
        score=_E + "score_answer",
        answer_loss=True,
        headline=("accuracy_flexible", "answer_loss"),
    ),
    Task(
        "organism",
        generate=partial(_generated, "organism"),
        calib_split="train",
        eval_split="eval",
        eval_size=SYNTHETIC_EVAL_SIZE,
        instruction=_STEP_BY_STEP,
        score=_E + "score_answer",
        answer_loss=True,
        headline=("accuracy_strict", "answer_loss"),
    ),
)

for _task in BUILTIN:
    if _task.name not in TASKS.names(read=False):
        TASKS.register(_task.name, _task, builtin=True)

__all__ = ["BUILTIN"]
