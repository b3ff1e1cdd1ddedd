"""Structured scores: how much each MLP channel and each whole layer matters (higher = keep).

Legend: B calibration examples (or one chunk of them), T time, L layers, F MLP width, E hidden,
A answer tokens.

Heads use CAP's head scores (`capjax.score_heads`, delta [L, H]). Here:

    channel_gradient_scores    [L, F]  first-order loss increase when channel f of layer l is removed:
                                       -d loss / d m at m = 1, m [L, F] multiplying each channel's
                                       activation (down_proj's input); loss = answer NLL per answer token
                               ("taylor": its absolute value, Molchanov et al.'s first-order Taylor importance)
    channel_activation_scores  [L, F]  Minitron's activation magnitude: mean |act(gate) * up| over real
                                       tokens (baseline)
    layer_ablation_scores      [L]     CAP block ablation: answer loss with layer l's attention and MLP
                                       removed (the layer skipped) minus the intact loss
    layer_influence_scores     [L]     ShortGPT's block influence: mean over real tokens of
                                       1 - cos(layer input, layer output) (baseline)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from capjax.ablation import ablate, prepare_batch
from capjax.ablation.spec import ablation_spec
from capjax.errors import NonFiniteError
from capjax.model import Decoder, apply_layer, layer_context, layer_params, token_nll
from capjax.structured.mask import channel_masked_params

CHANNEL_SCORES = ("gradient", "taylor", "activation")
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
        args = (jnp.asarray(tokens[s]), jnp.asarray(am[s]), jnp.asarray(b), jnp.asarray(t),
                jnp.asarray(tokens[s][b, target]))
        total = total + fn(*args)
        count += len(b)
    if count == 0:
        raise ValueError("loss_mask marks no answer tokens: structured scores need answers to measure")
    return total, count


def answer_loss(model: Decoder, params, tokens, loss_mask, attention_mask=None, channel_mask=None,
                batch_size: int = 8) -> float:
    """Token-level answer NLL (sum over answer tokens / their count), channels scaled by channel_mask."""
    c = model.config
    m = jnp.ones((c.num_layers, c.intermediate_size), jnp.float32) if channel_mask is None else jnp.asarray(
        channel_mask, jnp.float32)
    total, count = _per_chunk(model, params, tokens, loss_mask, attention_mask, batch_size,
                              lambda *a: answer_nll_sum(model, params, *a, m))
    return float(total) / count


def channel_gradient_scores(model: Decoder, params, tokens, loss_mask, attention_mask=None,
                            batch_size: int = 8) -> np.ndarray:
    """[L, F] -d loss / d m at m = 1 (see the module docstring), float64."""
    c = model.config
    ones = jnp.ones((c.num_layers, c.intermediate_size), jnp.float32)
    total, count = _per_chunk(model, params, tokens, loss_mask, attention_mask, batch_size,
                              lambda *a: _nll_grad(model, params, *a, ones))
    return _finite("channel gradient scores", -np.asarray(total, np.float64) / count)


def _layer_walk(model: Decoder, params, tokens, attention_mask, per_layer):
    """Runs the layers on one chunk, calling per_layer(l, x_in, x_out, captured inputs) for each."""
    x, ctx = layer_context(model, params, tokens, attention_mask)
    for l in range(model.config.num_layers):
        y, inputs = apply_layer(model, layer_params(params, l), x, ctx, capture=True, layer=l)
        per_layer(l, x, y, inputs)
        x = y


@partial(jax.jit, static_argnames=("model",))
def _activation_sums(model, params, tokens, attention_mask):
    """sum over real tokens of |down_proj input| [L, F]; 1 - cos(input, output) summed [L]."""
    real = attention_mask.astype(jnp.float32)  # [B, T]
    act, bi = [], []

    def per_layer(l, x, y, inputs):
        a = jnp.abs(inputs["mlp"]["down_proj"].astype(jnp.float32))  # [B, T, F]
        act.append(jnp.einsum("ntf,nt->f", a, real))
        xf, yf = x.astype(jnp.float32), y.astype(jnp.float32)
        cos = (xf * yf).sum(-1) / (jnp.linalg.norm(xf, axis=-1) * jnp.linalg.norm(yf, axis=-1))
        bi.append(((1.0 - cos) * real).sum())

    _layer_walk(model, params, tokens, attention_mask, per_layer)
    return jnp.stack(act), jnp.stack(bi)


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
    return _finite("channel activation scores", _activation_pass(model, params, tokens, attention_mask,
                                                                 batch_size)[0])


def layer_influence_scores(model: Decoder, params, tokens, attention_mask=None, batch_size: int = 8) -> np.ndarray:
    """[L] ShortGPT's block influence, mean over real tokens of 1 - cos(x_in, x_out), float64."""
    return _finite("layer influence scores", _activation_pass(model, params, tokens, attention_mask,
                                                              batch_size)[1])


def layer_ablation_scores(model: Decoder, params, tokens, loss_mask, attention_mask=None) -> np.ndarray:
    """[L] answer loss with layer l skipped (its attention and MLP outputs zeroed) minus the intact
    loss, token-level; one `capjax.ablation.ablate` call (packed rows, prefix reuse)."""
    c = model.config
    L = c.num_layers
    off = 1.0 - np.eye(L, dtype=np.float32)  # ablation l zeroes layer l's attn and mlp
    spec = ablation_spec(c, L, mlp=off, attn=off)
    batch = prepare_batch(model, tokens, loss_mask, attention_mask)
    return _finite("layer ablation scores", ablate(model, params, batch, spec, kind="zero", metric="ce").delta())


__all__ = ["CHANNEL_SCORES", "LAYER_SCORES", "answer_loss", "channel_activation_scores", "channel_gradient_scores",
           "layer_ablation_scores", "layer_influence_scores"]
