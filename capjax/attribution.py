"""CAP head attribution: the loss increase when one attention head is ablated.

Legend: N mask vectors, B calibration examples, T time, A answer tokens in the batch,
L layers, H query heads, U calibration subsets (K is kept for kv heads), E hidden, V vocab.

Loss: token-level cross-entropy = total NLL of the answer tokens / their count. `loss_mask[b, t]`
marks token t as an answer token; it is predicted from position t - 1.

Two exact paths, equal to 1e-5 in float32 (tests prove it):
- `head_ablation_losses`: any batch of masks [N, L, H], one jitted `vmap` over masks in chunks.
- `score_heads(method="ablation")`: every single-head ablation, with prefix reuse (the layers
  below the ablated layer are computed once and shared by its H ablations), the last layer and
  the logits only at answer positions, and the calibration examples packed into rows
  (`capjax.packing`: little padding, nothing after an example's last answer token, and the tokens
  every example starts with, such as a chat template's system prompt, computed once). One compiled
  call scans over layers; with `checkpoint_dir`, the same compiled function runs a few layers
  per call and saves each finished group with orbax, so a killed run resumes where it stopped.

With `mesh` (see `capjax.sharding`), params are sharded by `sharding.DEFAULT_RULES` and each
step's batch of masks is split over the "data" axis: d devices evaluate d times as many
ablations per step; `chunk_size` is then per device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax import sharding
from capjax.memory import chunk_size_for_memory, run_with_oom_fallback
from capjax.model import VOCAB_CHUNK, Decoder, apply_layer, layer_context, layer_params, token_nll
from capjax.packing import PackedBatch, one_per_row, pack_examples

Array = jax.Array
AGGREGATES = ("median", "mean", "paired")
METHODS = ("ablation", "gradient")


@dataclasses.dataclass(frozen=True)
class HeadScores:
    """delta [L, H]: estimated loss increase when the head is ablated (higher = more important).
    masked [U, L, H]: loss with that head ablated, per subset. baseline [U]: intact loss per subset."""

    delta: np.ndarray
    masked: np.ndarray
    baseline: np.ndarray
    aggregate: str = "median"
    method: str = "ablation"

    def save(self, path: str | Path, **settings: Any) -> None:
        np.savez(path, delta=self.delta, masked=self.masked, baseline=self.baseline,
                 settings=json.dumps({"aggregate": self.aggregate, "method": self.method, **settings}))

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        with np.load(path) as f:
            settings = json.loads(str(f["settings"])) if "settings" in f else {}
            return cls(f["delta"], f["masked"], f["baseline"], settings.get("aggregate", "median"),
                       settings.get("method", "ablation"))


def aggregate_scores(masked: np.ndarray, baseline: np.ndarray, aggregate: str = "median") -> np.ndarray:
    """delta [L, H] from masked [U, L, H] and baseline [U].

    median: median_k masked[k] - mean_k baseline[k] (the paper); mean: mean_k masked - mean_k baseline;
    paired: median_k (masked[k] - baseline[k]), which cancels between-subset difficulty.
    """
    if aggregate == "median":
        return np.median(masked, axis=0) - baseline.mean()
    if aggregate == "mean":
        return masked.mean(axis=0) - baseline.mean()
    if aggregate == "paired":
        return np.median(masked - baseline[:, None, None], axis=0)
    raise ValueError(f"unknown aggregate {aggregate!r}: use one of {AGGREGATES}")


# ---------------------------------------------------------------------------- answer positions
@dataclasses.dataclass(frozen=True)
class AnswerPositions:
    """Where the loss is read, flattened over the batch (no padding, so the LM head costs exactly
    one row per answer token): flat_pos [A] indexes hidden [B * T] (position t - 1 predicts token t),
    target [A], example [A] (its row b); count [B] answer tokens per example. A answer tokens."""

    flat_pos: np.ndarray
    target: np.ndarray
    example: np.ndarray
    count: np.ndarray


def answer_positions(tokens: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray | None = None,
                     segment_ids: np.ndarray | None = None, num_examples: int | None = None) -> AnswerPositions:
    """The answer tokens of a batch [B, T]: loss_mask > 0, not the first column, and predicted from a
    real token. With `segment_ids` (packed rows, `capjax.packing`), example = segment id - 1 (of
    `num_examples`) and the predicting token must belong to the same example."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"empty calibration set: tokens must be [N, T] with N >= 1, got shape {tokens.shape}; "
                         "build one with capjax.data.build_calibration(task, tokenizer, n=128)")
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
    return AnswerPositions((b * T + t - 1).astype(np.int32), tokens[b, t].astype(np.int32),
                           example.astype(np.int32), count.astype(np.float64))


def _last_layer_nll(model: Decoder, params, x: Array, ctx, head_mask_l: Array, ans, num_examples: int) -> Array:
    """Summed NLL per example [B] from the last layer's input x [P, S, E]: the last layer's o_proj
    and MLP, and the LM head, run only at the A answer positions."""
    L = model.config.num_layers
    h = apply_layer(model, layer_params(params, L - 1), x, ctx, head_mask_l, rows=ans[0], layer=L - 1)  # [A, E]
    _, target, example = ans
    return jax.ops.segment_sum(token_nll(model, params, h, target), example, num_segments=num_examples)


def _full_logits_nll(model: Decoder, params, tokens, attention_mask, head_mask, ans) -> Array:
    """The obvious path: full logits [B, T, V], then the same per-example NLL sums [B]."""
    logits = model.apply({"params": params}, tokens, head_mask=head_mask, attention_mask=attention_mask)
    B, T, V = logits.shape
    flat_pos, target, example = ans
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(B * T, V)[flat_pos]
    nll = -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
    return jax.ops.segment_sum(nll, example, num_segments=B)


# ---------------------------------------------------------------------------- chunk size
def default_chunk_size(config, batch: int, seq_len: int, dtype: Any = jnp.float32,
                       budget_bytes: float | None = None, answer_tokens: int | None = None,
                       vocab_chunk: int | None = VOCAB_CHUNK) -> int:
    """Ablations evaluated at once (per device) so that their activations fit in the free device
    memory, or `budget_bytes`: `capjax.memory.chunk_size_for_memory` (formula there). The default
    `vocab_chunk` is the fast paths' (`token_nll`); None counts full [A, V] logits. Callers
    run it under `run_with_oom_fallback`, which halves it after an out-of-memory error."""
    return chunk_size_for_memory(config, batch, seq_len, dtype, budget_bytes, answer_tokens,
                                 vocab_chunk=vocab_chunk)


# ---------------------------------------------------------------------------- general primitive
def _packed_nll(model: Decoder, params, rows, ans, num_examples: int, head_mask: Array) -> Array:
    """Summed NLL per example [B] under head_mask [L, H], on packed rows (tokens, segment_ids,
    positions) [P, S] and the shared prefix's tokens [Pf] (its shape is what counts); the last
    layer and the LM head run only at the answer positions."""
    L = model.config.num_layers
    tokens, segment_ids, positions, prefix = rows
    x, ctx = layer_context(model, params, tokens, positions=positions, segment_ids=segment_ids,
                           prefix_len=prefix.shape[0])
    x = jax.lax.fori_loop(0, L - 1, lambda l, x: apply_layer(model, layer_params(params, l), x, ctx, head_mask[l],
                                                             layer=l), x)
    return _last_layer_nll(model, params, x, ctx, head_mask[L - 1], ans, num_examples)


def _map_masks(one, masks, chunk_size, mesh):
    if mesh is not None:
        return sharding.sharded_map(one, masks, chunk_size, mesh)
    return jax.lax.map(one, masks, batch_size=chunk_size)


@partial(jax.jit, static_argnames=("model", "num_examples", "chunk_size", "mesh"))
def _masked_nll(model, params, rows, ans, num_examples, masks, chunk_size, mesh=None):
    """Per-example NLL sums [N, B] under each of masks [N, L, H]."""
    return _map_masks(partial(_packed_nll, model, params, rows, ans, num_examples), masks, chunk_size, mesh)


@partial(jax.jit, static_argnames=("model", "chunk_size", "mesh"))
def _naive_masked_nll(model, params, tokens, attention_mask, ans, masks, chunk_size, mesh=None):
    """The same from full [B, T, V] logits of the unpacked batch: the reference for the fast path."""
    return _map_masks(lambda m: _full_logits_nll(model, params, tokens, attention_mask, m, ans), masks, chunk_size,
                      mesh)


def _check_calibration(model, tokens, loss_mask, attention_mask):
    """(answer positions, tokens, loss_mask, attention_mask) as numpy, cut after the last answer
    token of the batch: later positions cannot change the loss of a causal model, so computing them
    (padding, end-of-turn tokens) would be wasted work."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    if attention_mask is None:
        attention_mask = np.ones(tokens.shape, np.int32)
    attention_mask = np.asarray(attention_mask)
    ans = answer_positions(tokens, loss_mask, attention_mask)
    if ans.count.sum() == 0:
        raise ValueError("the calibration batch has no answer tokens (loss_mask is all zero after position 0): "
                         "check the data builder or seq_len (answers may have been truncated away)")
    end = int((ans.flat_pos % tokens.shape[1]).max()) + 2  # last predicting position + its target
    if end < tokens.shape[1]:
        tokens, loss_mask, attention_mask = tokens[:, :end], loss_mask[:, :end], attention_mask[:, :end]
        ans = answer_positions(tokens, loss_mask, attention_mask)
    return ans, tokens.astype(np.int32), loss_mask, attention_mask.astype(np.int32)


def _ans_arrays(ans: AnswerPositions):
    return (jnp.asarray(ans.flat_pos), jnp.asarray(ans.target), jnp.asarray(ans.example))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A checked calibration batch: `ans` and `tokens`/`attention_mask` [B, T'] (numpy, cut after the
    last answer token); `packed` with its device arrays `rows` (tokens, segment_ids, positions,
    prefix) and answer positions `packed_ans`."""

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


def _prepare(model, tokens, loss_mask, attention_mask, pack: bool = True, share_prefix: bool = True) -> _Prepared:
    ans, tokens, loss_mask, attention_mask = _check_calibration(model, tokens, loss_mask, attention_mask)
    packed = (pack_examples(tokens, loss_mask, attention_mask, share_prefix=share_prefix) if pack
              else one_per_row(tokens, loss_mask, attention_mask))
    packed_ans = answer_positions(packed.tokens, packed.loss_mask, segment_ids=packed.segment_ids,
                                  num_examples=packed.num_examples)
    rows = tuple(jnp.asarray(a) for a in (packed.tokens, packed.segment_ids, packed.positions, packed.prefix))
    return _Prepared(ans, tokens, attention_mask, packed, rows, _ans_arrays(packed_ans))


def head_ablation_losses(model: Decoder, params, tokens, loss_mask, masks, attention_mask=None,
                         chunk_size: int | None = None, answer_only: bool = True, mesh=None) -> np.ndarray:
    """Loss [N] of the calibration batch under each head mask in `masks` [N, L, H].

    One jitted function: `vmap` over masks, `lax.map` over chunks of `chunk_size` masks (default
    from `default_chunk_size`, halved on out-of-memory errors), logits only at answer positions
    (and the last layer too) on the examples packed into rows (`capjax.packing`); answer_only=False
    computes full logits on the padded batch instead (the slow reference). With `mesh`, params
    are sharded by the default rules and the masks (padded to a multiple of the "data" axis) are
    split over "data".
    """
    c = model.config
    masks = jnp.asarray(masks, model.dtype)
    if masks.ndim != 3 or masks.shape[1:] != (c.num_layers, c.num_heads):
        raise ValueError(f"masks must be [N, L, H] = [N, {c.num_layers}, {c.num_heads}], got {tuple(masks.shape)}")
    prep = _prepare(model, tokens, loss_mask, attention_mask)
    ans = prep.ans
    shape = prep.shape if answer_only else prep.tokens.shape
    chunk = chunk_size or (default_chunk_size(c, *shape, model.dtype, answer_tokens=len(ans.target)) if answer_only
                           else default_chunk_size(c, *shape, model.dtype, vocab_chunk=None))
    n = masks.shape[0]
    if mesh is not None:
        params = sharding.shard_params(params, mesh)
        masks, _ = sharding.pad_to_multiple(masks, sharding.axis_size(mesh, sharding.DATA))
        masks = jax.device_put(masks, sharding.batch_sharding(mesh, masks.shape))
    if answer_only:
        def run(ch):
            return np.asarray(_masked_nll(model, params, prep.rows, prep.packed_ans, prep.packed.num_examples,
                                          masks, ch, mesh=mesh))
    else:
        def run(ch):
            return np.asarray(_naive_masked_nll(model, params, prep.tokens, prep.attention_mask, _ans_arrays(ans),
                                                masks, ch, mesh=mesh))
    nll = run_with_oom_fallback(run, chunk)
    losses = nll[:n].sum(axis=1) / ans.count.sum()
    _check_finite(losses, "head_ablation_losses")
    return losses


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(
            f"{what}: non-finite loss ({int((~np.isfinite(x)).sum())} of {x.size} values are NaN/inf). "
            "Check the params (NaN weights?), use float32 instead of bfloat16, or shorten seq_len.")


# ---------------------------------------------------------------------------- prefix reuse
@partial(jax.jit, static_argnames=("model", "num_examples", "num_layers", "chunk_size", "progress", "mesh"))
def _single_head_nll(model, params, packed, ans, num_examples, start, num_layers, chunk_size, progress=False,
                     mesh=None):
    """Per-example NLL sums [num_layers, H, B] for ablating each head of layers start..start+num_layers-1.

    packed: (tokens, segment_ids, positions) [P, S] and the shared prefix's tokens [Pf] from
    `capjax.packing.pack_examples`; ans: the answer positions in that layout, for B = num_examples
    examples.

    The intact layers below `start` run once; then a scan over the layers carries the intact
    hidden state, and for each layer its H ablations share it. The last layer runs
    o_proj and the MLP only at the answer positions, the only ones the loss reads. With `mesh`,
    the hidden states are kept replicated per ablation and the H ablations split over "data".
    """
    c = model.config
    L, H = c.num_layers, c.num_heads
    B = num_examples
    tokens, segment_ids, positions, prefix = packed
    x, ctx = layer_context(model, params, tokens, positions=positions, segment_ids=segment_ids,
                           prefix_len=prefix.shape[0])
    ones = jnp.ones((H,), model.dtype)

    def intact(i, x):
        return sharding.constrain_replicated(apply_layer(model, layer_params(params, i), x, ctx, ones, layer=i), mesh)

    def last_layer_nll(y, head_mask_l):
        return _last_layer_nll(model, params, y, ctx, head_mask_l, ans, B)

    x = jax.lax.fori_loop(0, start, intact, x)

    def ablate_layer(x, l):
        lp = layer_params(params, l)

        def below_last(head_mask_l):
            y = apply_layer(model, lp, x, ctx, head_mask_l, layer=l)
            return last_layer_nll(jax.lax.fori_loop(l + 1, L - 1, intact, y), ones)

        def one(head_mask_l):
            return jax.lax.cond(l < L - 1, below_last, partial(last_layer_nll, x), head_mask_l)

        single = 1.0 - jnp.eye(H, dtype=model.dtype)  # row h: head h ablated
        if mesh is not None:
            nll = sharding.sharded_map(one, single, chunk_size, mesh)
        else:
            nll = jax.lax.map(one, single, batch_size=chunk_size)  # [H, B]
        if progress:
            jax.debug.callback(_progress_tick, l)
        return apply_layer(model, lp, x, ctx, ones, layer=l), nll

    _, nll = jax.lax.scan(ablate_layer, x, start + jnp.arange(num_layers))
    return nll


_PROGRESS: dict[str, Any] = {}


def _progress_tick(layer) -> None:
    bar = _PROGRESS.get("bar")
    if bar is not None:
        bar.update(1)


@partial(jax.jit, static_argnames=("model", "num_examples"))
def _intact_nll(model, params, rows, ans, num_examples):
    c = model.config
    return _packed_nll(model, params, rows, ans, num_examples, jnp.ones((c.num_layers, c.num_heads), model.dtype))


@partial(jax.jit, static_argnames=("model", "num_examples"))
def _mask_gradient(model, params, rows, ans, num_examples, subset_onehot, subset_count):
    """d loss_k / d head_mask at all ones, per subset k: [U, L, H]."""
    c = model.config

    def losses(head_mask):
        per_example = _packed_nll(model, params, rows, ans, num_examples, head_mask.astype(model.dtype))
        return subset_onehot @ per_example / subset_count

    return jax.jacrev(losses)(jnp.ones((c.num_layers, c.num_heads), jnp.float32))


def _subsets(B: int, K: int) -> list[np.ndarray]:
    if K < 1:
        raise ValueError(f"subsets must be >= 1, got {K}")
    if K > B:
        raise ValueError(f"subsets={K} is larger than the calibration set ({B} examples): "
                         "use fewer subsets or more examples")
    return np.array_split(np.arange(B), K)


def _fingerprint(model, params, tokens, loss_mask, attention_mask, extra) -> str:
    h = hashlib.sha256()
    h.update(repr((model.config, str(model.dtype), extra)).encode())
    for a in (tokens, loss_mask, attention_mask):
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    for leaf in jax.tree.leaves(params):  # cheap: a few statistics per leaf, not the bytes
        h.update(np.asarray(jnp.stack([jnp.sum(leaf.astype(jnp.float32)),
                                       jnp.sum(jnp.abs(leaf.astype(jnp.float32)))])).tobytes())
    return h.hexdigest()[:16]


def score_heads(model: Decoder, params, tokens, loss_mask, subsets: int = 3, aggregate: str = "median",
                method: str = "ablation", attention_mask=None, chunk_size: int | None = None,
                checkpoint_dir: str | Path | None = None, layers_per_call: int | None = None,
                progress: bool = True, mesh=None, pack: bool = True, share_prefix: bool = True) -> HeadScores:
    """Scores every head: HeadScores(delta [L, H], masked [U, L, H], baseline [U]).

    Subsets are the U contiguous near-equal splits of the batch (numpy.array_split), each with its
    own token-level loss. method="ablation" is exact (prefix reuse, answer-only logits);
    method="gradient" is the first-order estimate masked[k] = baseline[k] - dL_k/dmask (Michel et
    al. 2019), one backward pass. With `checkpoint_dir`, finished layer groups are saved (orbax) and
    a rerun with the same arguments resumes from them. With `mesh`, params are sharded by
    `capjax.sharding.DEFAULT_RULES` and each layer's H single-head ablations are split over
    the mesh's "data" axis (`chunk_size` per device). With `pack` (default), the ablations run on
    the examples packed into rows (`capjax.packing`); pack=False keeps one example per row. With
    `share_prefix` (and `pack`), the tokens all examples start with (a chat template's system
    prompt) run once per ablation, not once per example (`capjax.packing`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}: use one of {AGGREGATES}")
    c = model.config
    prep = _prepare(model, tokens, loss_mask, attention_mask, pack, share_prefix)
    ans, B = prep.ans, prep.packed.num_examples
    groups = _subsets(B, subsets)
    onehot = np.zeros((len(groups), B), np.float32)
    for k, g in enumerate(groups):
        onehot[k, g] = 1.0
    subset_count = onehot @ ans.count
    if np.any(subset_count == 0):
        k = int(np.argmin(subset_count))
        raise ValueError(f"subset {k} (examples {groups[k][0]}..{groups[k][-1]}) has no answer tokens: "
                         "shuffle the calibration set or use fewer subsets")
    if mesh is not None:
        params = sharding.shard_params(params, mesh)
    baseline = onehot @ np.asarray(_intact_nll(model, params, prep.rows, prep.packed_ans, B)) / subset_count
    _check_finite(baseline, "intact calibration loss")

    if method == "gradient":
        grad = np.asarray(_mask_gradient(model, params, prep.rows, prep.packed_ans, B, jnp.asarray(onehot),
                                         jnp.asarray(subset_count)))
        masked = baseline[:, None, None] - grad
    else:
        nll = _ablation_nll(model, params, prep, chunk_size, checkpoint_dir, layers_per_call, progress,
                            fingerprint_args=(tokens, loss_mask, prep.attention_mask),
                            mesh=mesh)  # [L, H, B]
        masked = np.einsum("lhb,kb->klh", nll, onehot) / subset_count[:, None, None]
    _check_finite(masked, "masked calibration loss")
    return HeadScores(aggregate_scores(masked, baseline, aggregate), masked, baseline, aggregate, method)


def scoring_flops(config, rows: int, seq_len: int, answer_tokens: int, layers: range | None = None,
                  baseline: bool = True, prefix: int = 0) -> float:
    """Matmul FLOPs of exact scoring as `score_heads` schedules it, on a packed batch [rows, seq_len]
    (the shared prefix's row included) with A = answer_tokens and Pf = `prefix` shared tokens: the
    intact layers below the first scored layer; per scored layer l its intact carry and H ablations
    of (L - 1 - l) full layers, the last layer (o_proj and MLP at the A answer rows only) and the LM
    head on A rows; plus, with `baseline`, the intact forward. Attention is counted dense
    (4 N (Pf + S) H D per layer on N = rows * seq_len tokens)."""
    c = config
    E, F, H, K, D, L, V = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                           c.num_layers, c.vocab_size)
    layers = range(L) if layers is None else layers
    N, A = rows * seq_len, answer_tokens
    attention = 4 * N * (prefix + seq_len) * H * D
    full = 2 * N * (2 * E * H * D + 2 * E * K * D + 3 * E * F) + attention
    last = 2 * N * (E * H * D + 2 * E * K * D) + attention + 2 * A * (E * H * D + 3 * E * F)
    head = 2 * A * E * V
    total = layers.start * full + sum(full + H * ((L - 1 - l) * full + last + head) for l in layers)
    return total + (L * full + head if baseline else 0)


def _layer_groups(L: int, per_call: int) -> list[tuple[int, int]]:
    """Contiguous (start, size) groups of equal size (a divisor of L, so one compile serves all)."""
    size = max(d for d in range(1, L + 1) if L % d == 0 and d <= max(1, per_call))
    return [(s, size) for s in range(0, L, size)]


def _ablation_nll(model, params, prep: _Prepared, chunk_size, checkpoint_dir, layers_per_call, progress,
                  fingerprint_args, mesh=None) -> np.ndarray:
    c = model.config
    L, H = c.num_layers, c.num_heads
    packed, rows, ans = prep.packed, prep.rows, prep.packed_ans
    B = packed.num_examples
    per_device = H if mesh is None else -(-H // sharding.axis_size(mesh, sharding.DATA))
    chunk = min(chunk_size or default_chunk_size(c, *prep.shape, model.dtype,
                                                 answer_tokens=ans[0].shape[0]), per_device)
    if layers_per_call is None:
        layers_per_call = L if checkpoint_dir is None else max(1, math.ceil(L / 8))
    groups = _layer_groups(L, layers_per_call)
    store = None
    if checkpoint_dir is not None:
        # The requested chunk, not the memory-derived one, so that a resume does not depend on free memory.
        requested = min(chunk_size, H) if chunk_size else None
        layout = hashlib.sha256(packed.segment_ids.tobytes()).hexdigest()
        fp = _fingerprint(model, params, *fingerprint_args, (requested, len(groups), layout))
        store = _GroupStore(Path(checkpoint_dir), fp)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=L, desc=f"scoring {L * H} heads", unit="layer")
    out = np.zeros((L, H, B), np.float64)
    state = {"chunk": chunk}
    try:
        _PROGRESS["bar"] = bar
        for start, size in groups:
            done = store.load(start) if store else None
            if done is None:
                def run(ch, start=start, size=size):
                    state["chunk"] = ch  # keep a chunk reduced after an out-of-memory error
                    if bar is not None:  # a failed attempt may have ticked some layers
                        bar.n = start
                    return np.asarray(_single_head_nll(model, params, rows, ans, B, start, size, ch,
                                                       progress=bar is not None, mesh=mesh))
                done = run_with_oom_fallback(run, state["chunk"])
                if store:
                    store.save(start, done)
            elif bar is not None:
                bar.update(size)
            out[start:start + size] = done
    finally:
        _PROGRESS.pop("bar", None)
        if bar is not None:
            bar.close()
    return out


class _GroupStore:
    """Orbax checkpoints of finished layer groups under dir/<fingerprint>/layers_<start>."""

    def __init__(self, root: Path, fingerprint: str):
        import orbax.checkpoint as ocp

        self.dir = (root / fingerprint).absolute()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = ocp.PyTreeCheckpointer()

    def _path(self, start: int) -> Path:
        return self.dir / f"layers_{start:04d}"

    def load(self, start: int) -> np.ndarray | None:
        path = self._path(start)
        if not path.exists():
            return None
        return np.asarray(self.ckpt.restore(path)["nll"])

    def save(self, start: int, nll: np.ndarray) -> None:
        self.ckpt.save(self._path(start), {"nll": np.asarray(nll)}, force=True)
