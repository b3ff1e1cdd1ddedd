"""Tokenized calibration batches for CAP and the evaluation records they never overlap.

Calibration draws from each task's `calib_split` and evaluation from its held-out
`eval_split` (`capjax.data.task.Task`; the built-ins' in `capjax/data/tasks/`),
so the two never share a problem:

    task            calibration   evaluation
    gsm8k           train         test
    strategyqa      train         dev
    arc_challenge   train         test
    synthetic       "calib"       "eval"  (disjoint by construction)
    organism        "train"       "eval"  (disjoint by construction)

(ARC's official splits repeat a handful of question stems between train and test,
always with different choices, so the questions as shown to the model stay distinct.)

Shape legend: B examples, T time (= ``seq_len``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capjax.data.task import Task, calibration_task_names, get_task
from capjax.data.templates import format_example, use_chat

SYNTHETIC_EVAL_SIZE = 500  # eval_records("synthetic") size when n is not given


@dataclass
class CalibrationBatch:
    """Right-padded token batch with a mask over answer tokens.

    tokens:         [B, T] int32, padded with the pad id (pad, else eos, else 0).
    loss_mask:      [B, T] float32, 1 where token t is an answer token whose prediction
                    from position t-1 counts in the loss; always 0 at t = 0.
    attention_mask: [B, T] int32, 1 for real tokens, 0 for padding (on the right).
    n_truncated:    examples longer than T (cut on the right).
    task:           task name.
    texts:          (prompt_text, answer_text) per example.
    ids:            record id per example.
    truncated:      [B] bool, which examples were cut (None if unknown).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    n_truncated: int
    task: str
    texts: list[tuple[str, str]]
    ids: list[str] = field(default_factory=list)
    truncated: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not (self.tokens.shape == self.loss_mask.shape == self.attention_mask.shape):
            raise ValueError(
                f"shape mismatch: tokens {self.tokens.shape}, loss_mask {self.loss_mask.shape}, "
                f"attention_mask {self.attention_mask.shape}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays only: ``{"tokens", "loss_mask", "attention_mask"}``, each [B, T]."""
        return {
            "tokens": self.tokens,
            "loss_mask": self.loss_mask,
            "attention_mask": self.attention_mask,
        }

    def subset(self, idx: Sequence[int] | np.ndarray) -> CalibrationBatch:
        """The examples at ``idx``: indices [n], or a boolean mask ``idx`` [B]; in that order."""
        idx = np.arange(len(self))[np.asarray(idx)]
        truncated = None if self.truncated is None else self.truncated[idx]
        # Without per-example flags the count can only be bounded.
        n_trunc = int(truncated.sum()) if truncated is not None else min(self.n_truncated, len(idx))
        return CalibrationBatch(
            tokens=self.tokens[idx],
            loss_mask=self.loss_mask[idx],
            attention_mask=self.attention_mask[idx],
            n_truncated=n_trunc,
            task=self.task,
            texts=[self.texts[i] for i in idx] if self.texts else [],
            ids=[self.ids[i] for i in idx] if self.ids else [],
            truncated=truncated,
        )

    def trim(self, multiple: int = 1) -> CalibrationBatch:
        """Drop trailing all-padding columns, keeping T a multiple of ``multiple`` (for
        shape bucketing); never grows T."""
        used = int(np.flatnonzero(self.attention_mask.any(axis=0)).max(initial=-1)) + 1
        t = min(self.tokens.shape[1], -(-max(used, 1) // multiple) * multiple)
        return CalibrationBatch(
            tokens=self.tokens[:, :t],
            loss_mask=self.loss_mask[:, :t],
            attention_mask=self.attention_mask[:, :t],
            n_truncated=self.n_truncated,
            task=self.task,
            texts=self.texts,
            ids=self.ids,
            truncated=self.truncated,
        )


def _calibration_task(task: str) -> Task:
    t = get_task(task) if task in calibration_task_names() else None
    if t is None:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(calibration_task_names())}")
    return t


def eval_records(
    task: str, n: int | None = None, seed: int = 0, data_dir: str | os.PathLike | None = None
) -> list[dict]:
    """Evaluation records of ``task``'s held-out ``eval_split`` (gsm8k test, strategyqa dev,
    arc_challenge test, synthetic eval), disjoint from every calibration set. ``n=None``: the
    whole split in file order (a generated task: its ``eval_size``); else ``n`` in seeded order."""
    t = get_task(task)
    if t.eval_split is None or (t.load is None and t.generate is None):
        raise ValueError(f"task {task!r} ({t.mode}) has no evaluation records")
    return t.records(t.eval_split, n, seed, data_dir)


def _pad_id(tokenizer: Any) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def build_calibration(
    task: str,
    tokenizer: Any,
    n: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    chat: bool | None = None,
) -> CalibrationBatch:
    """Tokenize ``n`` seeded-random records of ``task`` into a [B, T=seq_len] batch.

    Records come from ``split`` (default: the task's ``calib_split``, its train split).
    Prompt and answer are tokenized separately and concatenated: the prompt with the
    tokenizer's own special tokens in plain mode, without in chat mode (the template
    text has them); the answer without. ``loss_mask`` covers the answer ids.
    Sequences longer than ``seq_len`` are cut on the right and counted in
    ``n_truncated``; one whose answer is cut completely keeps no loss tokens (warned).
    """
    t = _calibration_task(task)
    if n < 1:
        raise ValueError(f"empty calibration set: n={n}, need n >= 1")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} too small: need at least one prompt and one answer token")
    split = split or t.calib_split
    if split is None:
        raise ValueError(f"task {task!r} has no calibration split; give split=")
    records = t.records(split, n, seed, data_dir)
    texts = [format_example(r, task, tokenizer, chat) for r in records]
    prompt_ids = tokenizer([p for p, _ in texts], add_special_tokens=not use_chat(tokenizer, chat))["input_ids"]
    answer_ids = tokenizer([a for _, a in texts], add_special_tokens=False)["input_ids"]

    tokens = np.full((n, seq_len), _pad_id(tokenizer), dtype=np.int32)
    loss_mask = np.zeros((n, seq_len), dtype=np.float32)
    attention_mask = np.zeros((n, seq_len), dtype=np.int32)
    truncated = np.zeros(n, dtype=bool)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        ids = (list(p) + list(a))[:seq_len]
        truncated[i] = len(p) + len(a) > seq_len
        tokens[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, len(p) : len(ids)] = 1.0
    loss_mask[:, 0] = 0.0  # nothing predicts the first token

    no_answer = int((loss_mask.sum(axis=1) == 0).sum())
    if no_answer == n:
        raise ValueError(
            f"no answer tokens left in any of the {n} examples: seq_len={seq_len} is too "
            f"small (shortest prompt has {min(len(p) for p in prompt_ids)} tokens)"
        )
    if no_answer:
        warnings.warn(
            f"{no_answer} of {n} {task} examples lost their whole answer to truncation at "
            f"seq_len={seq_len}; they contribute no loss",
            stacklevel=2,
        )
    return CalibrationBatch(
        tokens=tokens,
        loss_mask=loss_mask,
        attention_mask=attention_mask,
        n_truncated=int(truncated.sum()),
        task=task,
        texts=texts,
        ids=[r["id"] for r in records],
        truncated=truncated,
    )
