"""Sequence packing for the loss: several calibration examples share one row, so that padding and
the tokens after each example's last answer token cost nothing.

Legend: B examples, T columns of the padded batch, P packed rows, S packed columns (the longest
kept suffix, or Pf), Pf shared prefix tokens, A answer tokens.

Each example keeps its real tokens up to its last answer token, contiguous and in order. Rows are
filled first-fit in order of decreasing length (deterministic). `segment_ids` [P, S] holds
example + 1 (0 = padding) and `positions` restart at 0 in every segment, so with the
segment-aware mask of `capjax.model.layer_context` each example sees exactly what it saw alone:
the loss is unchanged, up to float rounding.

Shared prefix: when every example starts with the same tokens (a chat template's system prompt and
instruction), those positions have the same hidden states in every example, under any head mask
(causal attention: they only see each other). `pack_examples` then stores them once, at the start
of row 0 (segment id -1), and the rows hold only each example's suffix (positions from Pf); every
segment attends to the prefix and to its own earlier tokens (`capjax.model.layer_context(
prefix_len=Pf)`). The prefix stops before the position that predicts the first answer token, so
every loss position stays in an example's segment.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """tokens, segment_ids, positions, loss_mask: [P, S]; num_examples: B (segment ids 1..B);
    prefix_len Pf: the tokens every example starts with, stored once at the start of row 0 with
    segment id -1 (Pf = 0: none shared)."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    num_examples: int
    prefix_len: int = 0

    @property
    def prefix(self) -> np.ndarray:
        """The shared prefix's tokens [Pf]."""
        return self.tokens[0, : self.prefix_len]


# A shared prefix is split off when it removes at least this fraction of the kept tokens: below
# that, the extra prefix row and keys cost about what they save.
MIN_PREFIX_SAVING = 0.05


def kept_tokens(attention_mask: np.ndarray, loss_mask: np.ndarray) -> list[np.ndarray]:
    """Per example, the columns that can change its loss: real tokens up to the last answer token."""
    kept = []
    for b in range(attention_mask.shape[0]):
        answer = np.flatnonzero(loss_mask[b] > 0)
        real = np.flatnonzero(attention_mask[b] > 0)
        keep = real[real <= answer.max()] if answer.size else real[:0]
        if keep.size and np.any(np.diff(keep) != 1):
            raise ValueError(
                f"example {b}: its real tokens are not contiguous (attention_mask has holes); "
                "only left or right padding can be packed"
            )
        kept.append(keep)
    return kept


def shared_prefix_length(tokens: np.ndarray, loss_mask: np.ndarray, kept: list[np.ndarray]) -> int:
    """Pf: how many leading kept tokens all examples share, ending before the position that
    predicts any example's first answer token (0 with fewer than two examples)."""
    seqs = [(tokens[b, keep], loss_mask[b, keep] > 0) for b, keep in enumerate(kept) if len(keep)]
    if len(seqs) < 2:
        return 0
    n = min(len(t) for t, _ in seqs)
    same = np.all(np.stack([t[:n] for t, _ in seqs]) == seqs[0][0][:n], axis=0)
    length = int(np.argmin(same)) if not same.all() else n
    # Answer token j (j >= 1) is predicted from position j - 1, which must stay in the rows.
    first_answer = min(int(np.flatnonzero(a[1:])[0]) + 1 if a[1:].any() else len(a) for _, a in seqs)
    return max(0, min(length, first_answer - 1))


def pack_examples(
    tokens: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray | None = None, share_prefix: bool = True
) -> PackedBatch:
    """Packs a padded batch [B, T] into [P, S] rows (first-fit decreasing, S = longest kept suffix).

    With `share_prefix`, the tokens all examples start with are stored once, at the start of row 0,
    when that removes at least MIN_PREFIX_SAVING of the kept tokens (module docstring). An answer
    token at the start of its segment (predicted from padding) is dropped, as in
    `capjax.attribution.answer_positions`.
    """
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    attention_mask = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    kept = kept_tokens(attention_mask, loss_mask)
    pf = shared_prefix_length(tokens, loss_mask, kept) if share_prefix else 0
    users = sum(1 for k in kept if len(k))
    if (users - 1) * pf < MIN_PREFIX_SAVING * sum(len(k) for k in kept):
        pf = 0
    prefix = tokens[0, :0]
    if pf:
        first = next(b for b, k in enumerate(kept) if len(k))
        prefix = tokens[first, kept[first][:pf]]
        kept = [k[pf:] if len(k) else k for k in kept]
    S = max(1, pf, max(len(k) for k in kept))
    rows: list[list[int]] = [[]] if pf else []  # row 0 starts with the prefix
    room: list[int] = [S - pf] if pf else []
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
    out = {
        name: np.zeros((P, S), dtype)
        for name, dtype in (
            ("tokens", np.int32),
            ("segment_ids", np.int32),
            ("positions", np.int32),
            ("loss_mask", np.float32),
        )
    }
    out["tokens"][0, :pf], out["segment_ids"][0, :pf], out["positions"][0, :pf] = prefix, -1, np.arange(pf)
    for r, members in enumerate(rows):
        at = pf if r == 0 else 0
        for b in members:
            keep, n = kept[b], len(kept[b])
            out["tokens"][r, at : at + n] = tokens[b, keep]
            out["segment_ids"][r, at : at + n] = b + 1
            out["positions"][r, at : at + n] = pf + np.arange(n)
            out["loss_mask"][r, at + 1 : at + n] = loss_mask[b, keep[1:]] > 0
            at += n
    return PackedBatch(**out, num_examples=tokens.shape[0], prefix_len=pf)


def one_per_row(tokens: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray | None = None) -> PackedBatch:
    """The same layout as the padded batch (example b alone in row b), for comparison with packing."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    attention_mask = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    real = attention_mask > 0
    segment_ids = (real * (np.arange(len(tokens)) + 1)[:, None]).astype(np.int32)
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
    return PackedBatch(
        tokens.astype(np.int32), segment_ids, positions, loss_mask.astype(np.float32), num_examples=len(tokens)
    )
