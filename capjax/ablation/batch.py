"""The prepared calibration batch: checked, cut after the last answer token, packed into rows.

Legend: B calibration examples, T columns of the padded batch, P packed rows, S packed columns,
Pf shared prefix tokens, A answer tokens.

Loss positions: `loss_mask[b, t]` marks token t as an answer token; it is predicted from position
t - 1. Everything the exact fast paths need is computed once here:

    batch = prepare_batch(model, tokens, loss_mask, attention_mask)   # [B, T] numpy inputs
    batch.rows            device (tokens, segment_ids, positions) [P, S] and prefix tokens [Pf]
    batch.packed_ans      device (flat_pos, target, example) [A]: the answer positions in the rows
    batch.count           [B] answer tokens per example
    x, ctx = capjax.model.layer_context(model, params, *batch.layer_inputs)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from capjax.packing import PackedBatch, one_per_row, pack_examples
from capjax.token_ids import check_token_ids

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AnswerPositions:
    """Where the loss is read, flattened over the batch (no padding, so the LM head costs exactly
    one row per answer token): flat_pos [A] indexes hidden [B * T] (position t - 1 predicts token t),
    target [A], example [A] (its row b); count [B] answer tokens per example. A answer tokens."""

    flat_pos: np.ndarray
    target: np.ndarray
    example: np.ndarray
    count: np.ndarray


def answer_positions(
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    attention_mask: np.ndarray | None = None,
    segment_ids: np.ndarray | None = None,
    num_examples: int | None = None,
) -> AnswerPositions:
    """The answer tokens of a batch [B, T]: loss_mask > 0, not the first column, and predicted from a
    real token. With `segment_ids` (packed rows, `capjax.packing`), example = segment id - 1 (of
    `num_examples`) and the predicting token must belong to the same example."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(
            f"empty calibration set: tokens must be [N, T] with N >= 1, got shape {tokens.shape}; "
            "build one with capjax.data.build_calibration(task, tokenizer, n=128)"
        )
    if loss_mask.shape != tokens.shape:
        raise ValueError(f"loss_mask shape {loss_mask.shape} != tokens shape {tokens.shape}")
    sel = loss_mask > 0
    sel[:, 0] = False  # the first token has no prediction
    if attention_mask is not None:
        real = np.asarray(attention_mask) > 0
        sel[:, 1:] &= real[:, 1:] & real[:, :-1]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        sel[:, 1:] &= (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    b, t = np.nonzero(sel)
    T = tokens.shape[1]
    if segment_ids is None:
        example, count = b, sel.sum(axis=1)
    else:
        example = seg[b, t] - 1
        count = np.bincount(example, minlength=num_examples or int(seg.max()))
    return AnswerPositions(
        (b * T + t - 1).astype(np.int32),
        tokens[b, t].astype(np.int32),
        example.astype(np.int32),
        count.astype(np.float64),
    )


def check_calibration(model, tokens, loss_mask, attention_mask):
    """(answer positions, tokens, loss_mask, attention_mask) as numpy, cut after the last answer
    token of the batch: later positions cannot change the loss of a causal model, so computing them
    (padding, end-of-turn tokens) would be wasted work."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    if attention_mask is None:
        attention_mask = np.ones(tokens.shape, np.int32)
    attention_mask = np.asarray(attention_mask)
    check_token_ids(tokens, model.config.vocab_size, "calibration tokens")
    ans = answer_positions(tokens, loss_mask, attention_mask)
    if ans.count.sum() == 0:
        raise ValueError(
            "the calibration batch has no answer tokens (loss_mask is all zero after position 0): "
            "check the data builder or seq_len (answers may have been truncated away)"
        )
    end = int((ans.flat_pos % tokens.shape[1]).max()) + 2  # last predicting position + its target
    if end < tokens.shape[1]:
        tokens, loss_mask, attention_mask = tokens[:, :end], loss_mask[:, :end], attention_mask[:, :end]
        ans = answer_positions(tokens, loss_mask, attention_mask)
    return ans, tokens.astype(np.int32), loss_mask, attention_mask.astype(np.int32)


def answer_arrays(ans: AnswerPositions) -> tuple[Array, Array, Array]:
    """(flat_pos, target, example) [A] as device arrays."""
    return (jnp.asarray(ans.flat_pos), jnp.asarray(ans.target), jnp.asarray(ans.example))


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """A checked calibration batch, ready for the exact fast paths.

    ans: answer positions of the padded batch; tokens / attention_mask [B, T'] numpy, cut after the
    last answer token; packed: the `capjax.packing.PackedBatch` ([P, S] rows, shared prefix [Pf]);
    rows: its device arrays (tokens, segment_ids, positions [P, S], prefix tokens [Pf]);
    packed_ans: device (flat_pos into P * S, target, example) [A] in the packed layout.
    """

    ans: AnswerPositions
    tokens: np.ndarray
    attention_mask: np.ndarray
    packed: PackedBatch
    rows: tuple[Array, Array, Array, Array]
    packed_ans: tuple[Array, Array, Array]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, keys per row) for the memory formula: the rows attend to Pf + S keys."""
        P, S = self.packed.tokens.shape
        return P, S + self.packed.prefix_len

    @property
    def num_examples(self) -> int:
        """B."""
        return self.packed.num_examples

    @property
    def count(self) -> np.ndarray:
        """Answer tokens per example [B] (float64)."""
        return self.ans.count

    @property
    def num_answer_tokens(self) -> int:
        """A."""
        return int(self.packed_ans[0].shape[0])

    @property
    def layer_inputs(self) -> tuple:
        """(tokens, None, positions, segment_ids, Pf): the arguments after (model, params) of
        `capjax.model.layer_context` for the packed rows."""
        tokens, segment_ids, positions, prefix = self.rows
        return tokens, None, positions, segment_ids, int(prefix.shape[0])


def prepare_batch(
    model, tokens, loss_mask, attention_mask=None, pack: bool = True, share_prefix: bool = True
) -> PreparedBatch:
    """Checks a calibration batch [B, T] (tokens, loss_mask, attention_mask; numpy or arrays), cuts it
    after the last answer token and packs it (`capjax.packing.pack_examples`; pack=False keeps one
    example per row; share_prefix computes the tokens every example starts with once)."""
    ans, tokens, loss_mask, attention_mask = check_calibration(model, tokens, loss_mask, attention_mask)
    packed = (
        pack_examples(tokens, loss_mask, attention_mask, share_prefix=share_prefix)
        if pack
        else one_per_row(tokens, loss_mask, attention_mask)
    )
    packed_ans = answer_positions(
        packed.tokens, packed.loss_mask, segment_ids=packed.segment_ids, num_examples=packed.num_examples
    )
    rows = (
        jnp.asarray(packed.tokens),
        jnp.asarray(packed.segment_ids),
        jnp.asarray(packed.positions),
        jnp.asarray(packed.prefix),
    )
    return PreparedBatch(ans, tokens, attention_mask, packed, rows, answer_arrays(packed_ans))
