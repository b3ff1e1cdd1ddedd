"""Sequence packing for the loss: several calibration examples share one row, so that padding and
the tokens after each example's last answer token cost nothing.

Legend: B examples, T columns of the padded batch, P packed rows, S packed columns (the longest
kept example), A answer tokens.

Each example keeps its real tokens up to its last answer token, contiguous and in order. Rows are
filled first-fit in order of decreasing length (deterministic). `segment_ids` [P, S] holds
example + 1 (0 = padding) and `positions` restart at 0 in every segment, so with the
segment-aware mask of `capjax.model.layer_context` each example sees exactly what it saw alone:
the loss is unchanged, up to float rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """tokens, segment_ids, positions, loss_mask: [P, S]; num_examples: B (segment ids 1..B)."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    num_examples: int


def kept_tokens(attention_mask: np.ndarray, loss_mask: np.ndarray) -> list[np.ndarray]:
    """Per example, the columns that can change its loss: real tokens up to the last answer token."""
    kept = []
    for b in range(attention_mask.shape[0]):
        answer = np.flatnonzero(loss_mask[b] > 0)
        real = np.flatnonzero(attention_mask[b] > 0)
        keep = real[real <= answer.max()] if answer.size else real[:0]
        if keep.size and np.any(np.diff(keep) != 1):
            raise ValueError(f"example {b}: its real tokens are not contiguous (attention_mask has holes); "
                             "only left or right padding can be packed")
        kept.append(keep)
    return kept


def pack_examples(tokens: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray | None = None
                  ) -> PackedBatch:
    """Packs a padded batch [B, T] into [P, S] rows (first-fit decreasing, S = longest kept example).

    An answer token at the start of its segment (predicted from padding) is dropped, as in
    `capjax.attribution.answer_positions`.
    """
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    attention_mask = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    kept = kept_tokens(attention_mask, loss_mask)
    S = max(1, max(len(k) for k in kept))
    rows: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(kept)), key=lambda b: -len(kept[b])):
        if not len(kept[b]):
            continue
        r = next((i for i, free in enumerate(room) if free >= len(kept[b])), None)
        if r is None:
            rows.append([])
            room.append(S)
            r = len(rows) - 1
        rows[r].append(b)
        room[r] -= len(kept[b])
    P = max(1, len(rows))
    out = {name: np.zeros((P, S), dtype) for name, dtype in
           (("tokens", np.int32), ("segment_ids", np.int32), ("positions", np.int32), ("loss_mask", np.float32))}
    for r, members in enumerate(rows):
        at = 0
        for b in members:
            keep, n = kept[b], len(kept[b])
            out["tokens"][r, at:at + n] = tokens[b, keep]
            out["segment_ids"][r, at:at + n] = b + 1
            out["positions"][r, at:at + n] = np.arange(n)
            out["loss_mask"][r, at + 1:at + n] = loss_mask[b, keep[1:]] > 0
            at += n
    return PackedBatch(**out, num_examples=tokens.shape[0])


def one_per_row(tokens: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray | None = None
                ) -> PackedBatch:
    """The same layout as the padded batch (example b alone in row b), for comparison with packing."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    attention_mask = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    real = attention_mask > 0
    segment_ids = (real * (np.arange(len(tokens)) + 1)[:, None]).astype(np.int32)
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
    return PackedBatch(tokens.astype(np.int32), segment_ids, positions, loss_mask.astype(np.float32),
                       num_examples=len(tokens))
