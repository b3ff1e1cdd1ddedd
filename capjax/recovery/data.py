"""Training batches for recovery: examples packed into rows as scoring packs them, then a seeded
order of rows per epoch.

Legend: B examples, T their padded length, P packed rows, S packed columns, M micro-batches per
step (gradient accumulation), b rows per micro-batch (M b = batch size).

Each example keeps its real tokens up to its last loss token (`capjax.packing.pack_examples`,
without a shared prefix: every row must stand alone in a batch); `loss_mask[p, s]` marks token s
as predicted from position s - 1 of the same example. The rows of step k are a pure function of
(rng, k), so the data position of a resumed run is its step count.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from capjax.packing import pack_examples


class RecoveryDataError(ValueError):
    """Recovery data that cannot train anything (empty, no loss tokens, bad source)."""


@dataclasses.dataclass(frozen=True)
class RecoveryData:
    """Packed rows: tokens, segment_ids, positions int32 and loss_mask float32, each [P, S]."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def fingerprint(self) -> bytes:
        return b"".join(np.ascontiguousarray(a).tobytes() for a in (self.tokens, self.segment_ids, self.loss_mask))


def _get(batch: Any, key: str) -> Any:
    return batch.get(key) if isinstance(batch, dict) else getattr(batch, key, None)


def pack_for_training(batch: Any) -> RecoveryData:
    """A CalibrationBatch (or a dict with tokens, loss_mask, optional attention_mask [B, T]) packed."""
    if isinstance(batch, RecoveryData):
        return batch
    tokens, loss_mask = _get(batch, "tokens"), _get(batch, "loss_mask")
    if tokens is None or loss_mask is None:
        raise RecoveryDataError("recovery data needs tokens and loss_mask [B, T] (a CalibrationBatch or a dict)")
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise RecoveryDataError(
            f"empty recovery data: tokens must be [B, T] with B >= 1 and T >= 2, got shape {list(tokens.shape)}"
        )
    if loss_mask.shape != tokens.shape:
        raise RecoveryDataError(f"loss_mask shape {list(loss_mask.shape)} != tokens shape {list(tokens.shape)}")
    am = _get(batch, "attention_mask")
    packed = pack_examples(tokens, loss_mask, am, share_prefix=False)
    data = RecoveryData(packed.tokens, packed.segment_ids, packed.positions, packed.loss_mask)
    if data.loss_tokens == 0:
        raise RecoveryDataError(
            "recovery data has no loss tokens (loss_mask is zero after each example's first "
            "token): check the data builder or seq_len"
        )
    return data


def text_examples(tokenizer: Any, text: str, seq_len: int, n: int) -> dict[str, np.ndarray]:
    """Plain text as up to n consecutive chunks of seq_len tokens, every token but the first in the loss."""
    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
    rows = min(n, len(ids) // seq_len)
    if rows < 1:
        raise RecoveryDataError(f"the text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    tokens = ids[: rows * seq_len].reshape(rows, seq_len)
    loss_mask = np.ones(tokens.shape, np.float32)
    loss_mask[:, 0] = 0
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": np.ones(tokens.shape, np.int32)}


def build_recovery_data(
    source: str, tokenizer: Any, n: int, seq_len: int, seed: int = 0, data_dir: str | os.PathLike | None = None
) -> RecoveryData:
    """`source`: a calibration task (its train split, `capjax.data.build_calibration`) or "text:PATH"."""
    if source.startswith("text:"):
        path = Path(source[5:])
        if not path.is_file():
            raise FileNotFoundError(f"recovery.data: text file not found: {path}")
        return pack_for_training(text_examples(tokenizer, path.read_text(encoding="utf-8"), seq_len, n))
    from capjax.data import build_calibration

    return pack_for_training(build_calibration(source, tokenizer, n=n, seq_len=seq_len, seed=seed, data_dir=data_dir))


def step_rows(rng: jax.Array, step: int, num_rows: int, batch_size: int) -> np.ndarray:
    """Row indices [batch_size] of step `step`: consecutive slices of a permutation of the P rows,
    a new permutation (fold_in(rng, epoch)) every epoch."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, at = divmod(i, num_rows)
        out.append(int(_permutation(rng, epoch, num_rows)[at]))
    return np.asarray(out, np.int32)


_PERM_CACHE: dict[tuple, np.ndarray] = {}


def _permutation(rng: jax.Array, epoch: int, num_rows: int) -> np.ndarray:
    key = (tuple(np.asarray(rng).ravel().tolist()), epoch, num_rows)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 64:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), num_rows))
    return _PERM_CACHE[key]


def step_batch(
    data: RecoveryData, rng: jax.Array, step: int, batch_size: int, grad_accum: int
) -> dict[str, np.ndarray]:
    """The arrays of step `step`, each [M, b, S]."""
    rows = step_rows(rng, step, len(data), batch_size)
    b = batch_size // grad_accum
    return {
        k: getattr(data, k)[rows].reshape(grad_accum, b, -1)
        for k in ("tokens", "segment_ids", "positions", "loss_mask")
    }
