"""Prompt and answer templates shared by calibration and evaluation.

A record (see ``sources``) becomes a pair ``(prompt_text, answer_text)``. The model is
scored on the answer (chain of thought, then the final answer), conditioned on the
prompt; evaluation generates from the very same ``build_prompt`` text.

Answer text (``A``)::

    gsm8k, synthetic, organism : "{reasoning}\\nThe answer is {answer}."
    strategyqa       : "{reasoning}\\nThe answer is {yes|no}."
    arc_challenge    : "The answer is {label}."     (ARC ships no chain of thought)

Question body (``Q``): the record's question; for ARC the stem followed by one line
per choice, ``"{label}. {text}"``, with the labels as given (A-E or 1-4).

Prompt, chat mode (default when the tokenizer has a ``chat_template``)::

    tokenizer.apply_chat_template(
        [{"role": "user", "content": INSTRUCTION[task] + "\\n\\n" + Q}],
        tokenize=False, add_generation_prompt=True)

    and the answer text is ``A`` (it directly follows the generation prompt).

Prompt, plain mode (no chat template, or ``chat=False``)::

    "Question: {Q}\\nAnswer:"      and the answer text is " " + A

Instructions (each task's ``instruction``, `capjax.data.task.Task`)::

    gsm8k, synthetic, organism : STEP_BY_STEP, "Solve the problem step by step and end with 'The answer is N.'"
    strategyqa       : "Answer the yes/no question. Reason step by step and end with
                        'The answer is yes.' or 'The answer is no.'"
    arc_challenge    : "Choose the correct option. End with 'The answer is X.' where X
                        is the label of the option."
"""

from __future__ import annotations

from typing import Any

from capjax.errors import MissingDependencyError

STEP_BY_STEP = "Solve the problem step by step and end with 'The answer is N.'"  # gsm8k, synthetic, organism


def _task(task: str):
    from capjax.data.task import get_task

    return get_task(task)


def use_chat(tokenizer: Any, chat: bool | None = None) -> bool:
    """Whether prompts are built with the chat template: ``chat`` if given, else whether
    the tokenizer has one."""
    if chat is not None:
        return chat
    return bool(getattr(tokenizer, "chat_template", None))


def question_text(record: dict, task: str) -> str:
    """The question body: the question, plus lettered choices for ARC (the task's `question`)."""
    return _task(task).question_text(record)


def answer_body(record: dict, task: str) -> str:
    """The answer text without the plain-mode leading space (the task's `answer`)."""
    return _task(task).answer_text(record)


def _require_jinja2() -> None:
    # transformers renders chat templates with jinja2 but does not declare it; say the fix in one line.
    try:
        import jinja2  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("chat templates need jinja2 (a capjax dependency): pip install jinja2") from e


def build_prompt(record: dict, task: str, tokenizer: Any, chat: bool | None = None) -> str:
    """The prompt text (chat template or ``"Question: ...\\nAnswer:"``), as used for both
    calibration and generation at evaluation."""
    t = _task(task)
    body = t.question_text(record)
    if use_chat(tokenizer, chat):
        _require_jinja2()
        content = f"{t.instruction}\n\n{body}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {body}\nAnswer:"


def format_example(record: dict, task: str, tokenizer: Any, chat: bool | None = None) -> tuple[str, str]:
    """``(prompt_text, answer_text)`` for one record; see the module docstring."""
    prompt = build_prompt(record, task, tokenizer, chat)
    answer = answer_body(record, task)
    return prompt, answer if use_chat(tokenizer, chat) else " " + answer
