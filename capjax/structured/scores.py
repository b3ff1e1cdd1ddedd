"""Structured scores: how much each MLP channel and each whole layer matters (higher = keep).

Legend: B calibration examples (or one chunk of them), T time, L layers, H heads, D head dim, F MLP width, E hidden,
A answer tokens, Y channel groups per layer, N ablations (masked models).

Heads use CAP's head scores (`capjax.score_heads`, delta [L, H]). Here:

    channel_gradient_scores    [L, F]  first-order loss increase when channel f of layer l is removed:
                                       -d loss / d m at m = 1, m [L, F] multiplying each channel's
                                       activation (down_proj's input); loss = answer NLL per answer token
                               ("taylor": its absolute value, Molchanov et al.'s first-order Taylor importance)
    channel_group_ablation_scores [L, Y]  exact: answer loss with the channels of group m of layer l zeroed
                                       together, minus the intact loss (N = L Y ablations, vmapped, each
                                       from its layer's intact input); groups [L, F] from
                                       `contiguous_groups` or `rank_groups`
    channel_activation_scores  [L, F]  Minitron's activation magnitude: mean |act(gate) * up| over real
                                       tokens (baseline)
    head_activation_scores     [L, H]  Minitron's head activation: mean over real tokens of the L2 norm of
                                       head h's attention output before o_proj (`attn.z`) (baseline)
    layer_ablation_scores      [L]     CAP block ablation: answer loss with layer l's attention and MLP
                                       removed (the layer skipped) minus the intact loss
    layer_influence_scores     [L]     ShortGPT's block influence: mean over real tokens of
                                       1 - cos(layer input, layer output) (baseline)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.ablation import ablate, prepare_batch
from capjax.ablation.core import intact_inputs, intact_values, intervened_values
from capjax.ablation.metrics import get_metric
from capjax.ablation.progress import showing, tick
from capjax.ablation.spec import ablation_spec
from capjax.errors import NonFiniteError
from capjax.model import Decoder, layer_context, token_nll
from capjax.scan import scan_layers
from capjax.sites import Edit, Interventions
from capjax.structured.mask import channel_masked_params

CHANNEL_SCORES = ("gradient", "taylor", "activation", "ablation")
LAYER_SCORES = ("ablation", "influence")


def _finite(name: str, a: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name}: NaN or Inf scores; check the params (NaN weights?) or use float32")
    return a


def _chunks(B: int, batch_size: int):
    return [slice(i, min(i + batch_size, B)) for i in range(0, B, batch_size)]


def answer_rows(loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example b [A], predicting position t - 1 [A], target position t [A]) of every answer token."""
    b, t = np.nonzero(np.asarray(loss_mask)[:, 1:] > 0)
    return b, t, t + 1


def _nll_sum(model: Decoder, params, tokens, attention_mask, rows_b, rows_t, targets, channel_mask):
    """Summed answer NLL of a chunk [B, T] with each MLP channel scaled by channel_mask [L, F]; the
    answer rows (example rows_b [A], position rows_t [A]) predict targets [A]."""
    p = channel_masked_params(params, channel_mask)
    x, _ = model.apply({"params": p}, tokens, attention_mask=attention_mask, method=Decoder.hidden_states)
    return token_nll(model, p, x[rows_b, rows_t], targets).sum()


answer_nll_sum = jax.jit(_nll_sum, static_argnames=("model",))
_nll_grad = jax.jit(jax.grad(_nll_sum, argnums=7), static_argnames=("model",))


def _per_chunk(model, params, tokens, loss_mask, attention_mask, batch_size, fn):
    """Sum of fn(chunk args) over chunks of examples, and the number of answer tokens."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    am = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    total, count = 0.0, 0
    for s in _chunks(tokens.shape[0], batch_size):
        b, t, target = answer_rows(loss_mask[s])
        if len(b) == 0:
            continue
        args = (
            jnp.asarray(tokens[s]),
            jnp.asarray(am[s]),
            jnp.asarray(b),
            jnp.asarray(t),
            jnp.asarray(tokens[s][b, target]),
        )
        total = total + fn(*args)
        count += len(b)
    if count == 0:
        raise ValueError("loss_mask marks no answer tokens: structured scores need answers to measure")
    return total, count


def answer_loss(
    model: Decoder, params, tokens, loss_mask, attention_mask=None, channel_mask=None, batch_size: int = 8
) -> float:
    """Token-level answer NLL (sum over answer tokens / their count), channels scaled by channel_mask."""
    c = model.config
    m = (
        jnp.ones((c.num_layers, c.intermediate_size), jnp.float32)
        if channel_mask is None
        else jnp.asarray(channel_mask, jnp.float32)
    )
    total, count = _per_chunk(
        model, params, tokens, loss_mask, attention_mask, batch_size, lambda *a: answer_nll_sum(model, params, *a, m)
    )
    return float(total) / count


def channel_gradient_scores(
    model: Decoder, params, tokens, loss_mask, attention_mask=None, batch_size: int = 8
) -> np.ndarray:
    """[L, F] -d loss / d m at m = 1 (see the module docstring), float64."""
    c = model.config
    ones = jnp.ones((c.num_layers, c.intermediate_size), jnp.float32)
    total, count = _per_chunk(
        model, params, tokens, loss_mask, attention_mask, batch_size, lambda *a: _nll_grad(model, params, *a, ones)
    )
    return _finite("channel gradient scores", -np.asarray(total, np.float64) / count)


def contiguous_groups(config, size: int) -> np.ndarray:
    """[L, F] group of each channel: blocks of `size` consecutive channels (the last may be smaller)."""
    if not 1 <= int(size) <= config.intermediate_size:
        raise ValueError(f"group size {size}: use 1 to {config.intermediate_size} (the MLP width)")
    return np.broadcast_to(
        np.arange(config.intermediate_size) // int(size), (config.num_layers, config.intermediate_size)
    ).copy()


def rank_groups(scores, size: int) -> np.ndarray:
    """[L, F] groups of `size` channels of neighbouring rank in scores [L, F] (group 0: the lowest)."""
    scores = np.asarray(scores)
    L, F = scores.shape
    if not 1 <= int(size) <= F:
        raise ValueError(f"group size {size}: use 1 to {F} (the MLP width)")
    rank = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")  # [L, F]
    return rank // int(size)


@partial(jax.jit, static_argnames=("model", "num_examples", "metric", "chunk_size", "on_ablation"))
def _group_values(
    model, params, rows, ans, num_examples, metric, inputs, groups, layer, group, chunk_size, on_ablation=None
):
    """[N, B] the metric summed per example with the channels of group group[n] of layer layer[n]
    zeroed at mlp.hidden (groups [L, F]; layer, group [N]); each ablation starts from its layer's
    intact input (inputs [L, P, S, E]: prefix reuse); on_ablation(l): a host callback per ablation."""
    L = model.config.num_layers

    def one(item):
        l, m = item
        keep = jnp.where((jnp.arange(L)[:, None] == l) & (groups == m), 0.0, 1.0).astype(model.dtype)  # [L, F]
        iv = Interventions({"mlp.hidden": Edit(keep=keep)})
        values = intervened_values(model, params, rows, ans, num_examples, metric, None, iv, l, inputs)
        if on_ablation is not None:
            jax.debug.callback(on_ablation, l)  # once per ablation, in its vmapped step
        return values

    return jax.lax.map(one, (layer, group), batch_size=chunk_size)


def channel_group_ablation_scores(
    model: Decoder,
    params,
    tokens,
    loss_mask,
    groups,
    attention_mask=None,
    ablation_batch: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """[L, Y] exact answer-loss increase (token-level, as `answer_loss`) when every channel of group m
    of layer l is zeroed (groups [L, F] ints in [0, Y)), float64. N = L Y ablations on the calibration
    examples packed into rows (`capjax.ablation.prepare_batch`); each starts from the intact input of
    its layer (the layers below are computed once), the last layer and the LM head run only at the
    answer positions; at most `ablation_batch` ablations per vmapped step (the largest count that
    divides Y, so a step never mixes layers). `progress`: a bar over the N ablations."""
    c = model.config
    groups = np.asarray(groups)
    if groups.shape != (c.num_layers, c.intermediate_size) or groups.min() < 0:
        raise ValueError(
            f"groups must be [L, F] = {[c.num_layers, c.intermediate_size]} non-negative group ids, "
            f"got shape {list(groups.shape)}"
        )
    M = int(groups.max()) + 1
    batch = prepare_batch(model, tokens, loss_mask, attention_mask)
    ce, B = get_metric("ce"), batch.num_examples
    inputs = intact_inputs(model, params, batch.rows)  # [L, P, S, E]
    layer, group = np.divmod(np.arange(c.num_layers * M, dtype=np.int32), M)  # ablation n = l Y + m
    from tqdm.auto import tqdm

    with showing(tqdm(total=layer.size, desc="ablating channel groups", unit="ablation", disable=not progress)):
        values = _group_values(
            model,
            params,
            batch.rows,
            batch.packed_ans,
            B,
            ce,
            inputs,
            jnp.asarray(groups, jnp.int32),
            jnp.asarray(layer),
            jnp.asarray(group),
            max(d for d in range(1, max(1, min(int(ablation_batch), M)) + 1) if M % d == 0),
            tick if progress else None,
        )  # [N, B]; each step's ablations are of one layer (the step size divides Y)
        values = np.asarray(values)
        jax.effects_barrier()  # every tick has reached the bar
    intact = np.asarray(intact_values(model, params, batch.rows, batch.packed_ans, B, ce), np.float64)  # [B]
    count = float(batch.count.sum())
    delta = (np.asarray(values, np.float64).sum(axis=1) - intact.sum()) / count
    return _finite("channel group ablation scores", delta.reshape(c.num_layers, M))


def group_scores_to_channels(delta, groups, tiebreak) -> np.ndarray:
    """[L, F] channel scores ordering channels by their group's delta [L, Y], then by tiebreak [L, F]
    inside a group (for `choose`: only the order matters)."""
    delta, groups, tiebreak = np.asarray(delta), np.asarray(groups), np.asarray(tiebreak)
    L, F = groups.shape
    group_rank = np.argsort(np.argsort(delta, axis=1, kind="stable"), axis=1, kind="stable")  # [L, Y]
    inner = np.argsort(np.argsort(tiebreak, axis=1, kind="stable"), axis=1, kind="stable")  # [L, F]
    return np.take_along_axis(group_rank, groups, axis=1).astype(np.float64) * F + inner


@partial(jax.jit, static_argnames=("model",))
def _activation_sums(model, params, tokens, attention_mask):
    """sum over real tokens of |down_proj input| (mlp.hidden) [L, F]; 1 - cos(input, output) summed
    [L]; reduced layer by layer inside the one layer scan (nothing [L, B, T, F] is kept)."""
    real = attention_mask.astype(jnp.float32)  # [B, T]

    def per_layer(x, y, sites):
        a = jnp.abs(sites["mlp.hidden"].astype(jnp.float32))  # [B, T, F]
        xf, yf = x.astype(jnp.float32), y.astype(jnp.float32)
        cos = (xf * yf).sum(-1) / (jnp.linalg.norm(xf, axis=-1) * jnp.linalg.norm(yf, axis=-1))
        return jnp.einsum("ntf,nt->f", a, real), ((1.0 - cos) * real).sum()

    x, ctx = layer_context(model, params, tokens, attention_mask)
    iv = Interventions(capture=frozenset({"mlp.hidden"}))
    return scan_layers(model, params, x, ctx, iv=iv, collect=per_layer)[1]


def _activation_pass(model, params, tokens, attention_mask, batch_size):
    tokens = np.asarray(tokens)
    am = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    act, bi = 0.0, 0.0
    for s in _chunks(tokens.shape[0], batch_size):
        a, b = _activation_sums(model, params, jnp.asarray(tokens[s]), jnp.asarray(am[s]))
        act, bi = act + np.asarray(a, np.float64), bi + np.asarray(b, np.float64)
    n = float(am.sum())
    if n == 0:
        raise ValueError("attention_mask marks no real tokens")
    return act / n, bi / n


def channel_activation_scores(model: Decoder, params, tokens, attention_mask=None, batch_size: int = 8) -> np.ndarray:
    """[L, F] Minitron's mean |activation| of each MLP channel over real tokens, float64."""
    return _finite("channel activation scores", _activation_pass(model, params, tokens, attention_mask, batch_size)[0])


@partial(jax.jit, static_argnames=("model",))
def _head_norm_sums(model, params, tokens, attention_mask):
    """sum over real tokens of ||attn.z|| per head [L, H]."""
    from capjax.cache import run_with_cache

    _, cache = run_with_cache(model, params, tokens, ["attn.z"], attention_mask=attention_mask)
    z = cache["attn.z"].astype(jnp.float32)  # [L, B, T, H, D]
    return jnp.einsum("lbth,bt->lh", jnp.linalg.norm(z, axis=-1), attention_mask.astype(jnp.float32))


def head_activation_scores(model: Decoder, params, tokens, attention_mask=None, batch_size: int = 8) -> np.ndarray:
    """[L, H] Minitron's head importance: mean over real tokens of ||attn.z[l, h]||_2, float64."""
    tokens = np.asarray(tokens)
    am = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    total: Any = 0.0  # then [L, H]
    for s in _chunks(tokens.shape[0], batch_size):
        total = total + np.asarray(
            _head_norm_sums(model, params, jnp.asarray(tokens[s]), jnp.asarray(am[s])), np.float64
        )
    if am.sum() == 0:
        raise ValueError("attention_mask marks no real tokens")
    return _finite("head activation scores", total / float(am.sum()))


def layer_influence_scores(model: Decoder, params, tokens, attention_mask=None, batch_size: int = 8) -> np.ndarray:
    """[L] ShortGPT's block influence, mean over real tokens of 1 - cos(x_in, x_out), float64."""
    return _finite("layer influence scores", _activation_pass(model, params, tokens, attention_mask, batch_size)[1])


def layer_ablation_scores(model: Decoder, params, tokens, loss_mask, attention_mask=None) -> np.ndarray:
    """[L] answer loss with layer l skipped (its attention and MLP outputs zeroed) minus the intact
    loss, token-level; one `capjax.ablation.ablate` call (packed rows, prefix reuse)."""
    c = model.config
    L = c.num_layers
    off = 1.0 - np.eye(L, dtype=np.float32)  # ablation l zeroes layer l's attn and mlp
    spec = ablation_spec(c, L, mlp=off, attn=off)
    batch = prepare_batch(model, tokens, loss_mask, attention_mask)
    return _finite("layer ablation scores", ablate(model, params, batch, spec, kind="zero", metric="ce").delta())


__all__ = [
    "CHANNEL_SCORES",
    "LAYER_SCORES",
    "answer_loss",
    "channel_activation_scores",
    "channel_gradient_scores",
    "channel_group_ablation_scores",
    "contiguous_groups",
    "group_scores_to_channels",
    "head_activation_scores",
    "rank_groups",
    "layer_ablation_scores",
    "layer_influence_scores",
]
