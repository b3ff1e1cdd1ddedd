"""ARC-Challenge: multiple choice scored by the log-likelihood of each option."""

from functools import partial

from capjax.data.sources import FILES, load_records
from capjax.data.task import Task, register_task


def arc_question(record: dict) -> str:
    """The stem, then one line per choice, "{label}. {text}", with the labels as given."""
    return "\n".join([record["question"]] + [f"{label}. {text}" for label, text in record["choices"]])


def arc_answer(record: dict) -> str:
    return f"The answer is {record['answer_label']}."  # ARC ships no chain of thought


TASK = register_task(
    Task(
        "arc_challenge",
        mode="loglikelihood",
        files=FILES["arc_challenge"],
        calib_split="train",
        eval_split="test",
        load=partial(load_records, "arc_challenge"),
        instruction="Choose the correct option. End with 'The answer is X.' where X is the label of the option.",
        question=arc_question,
        answer=arc_answer,
        run="capjax.evaluate.tasks:arc_task",
        headline=("acc", "acc_norm"),
    ),
    _builtin=True,
)
