"""The dense model with a `Plan`'s removal applied as masks: the oracle `shrink` must equal.

Legend: B batch, T time, L layers, H query heads, F MLP width, E hidden, V vocab.

Removed heads are zeroed before o_proj by the decoder's own `head_mask`; removed MLP channels by
multiplying down_proj's rows (the channel's activation times zero); removed layers are skipped
(the residual stream passes them unchanged). Layers keep their index, so Gemma's sliding and
global layers keep their attention type.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from capjax.model import Decoder, apply_layer, layer_context, layer_params, unembed
from capjax.structured.plan import Plan

Params = dict[str, Any]


def channel_masked_params(params: Params, channel_mask) -> Params:
    """params with down_proj row f of layer l multiplied by channel_mask [L, F]."""
    down = params["layers"]["mlp"]["down_proj"]["kernel"]  # [L, F, E]
    scaled = down * jnp.asarray(channel_mask, down.dtype)[:, :, None]
    return {
        **params,
        "layers": {**params["layers"], "mlp": {**params["layers"]["mlp"], "down_proj": {"kernel": scaled}}},
    }


def masked_hidden(
    model: Decoder, params: Params, tokens, attention_mask=None, head_mask=None, channel_mask=None, layer_kept=None
) -> jax.Array:
    """Final hidden states [B, T, E] (before the final norm) of the dense model with head_mask [L, H],
    channel_mask [L, F] (None: all ones) and only the layers where layer_kept [L] is True."""
    c = model.config
    if channel_mask is not None:
        params = channel_masked_params(params, channel_mask)
    hm = (
        jnp.ones((c.num_layers, c.num_heads), model.dtype) if head_mask is None else jnp.asarray(head_mask, model.dtype)
    )
    x, ctx = layer_context(
        model, params, jnp.asarray(tokens), None if attention_mask is None else jnp.asarray(attention_mask)
    )
    for l in range(c.num_layers):
        if layer_kept is None or layer_kept[l]:
            x = apply_layer(model, layer_params(params, l), x, ctx, hm[l], layer=l)
    return x


def masked_logits(model: Decoder, params: Params, plan: Plan, tokens, attention_mask=None) -> jax.Array:
    """Logits [B, T, V] of the dense model under the plan's masks."""
    c = model.config
    x = masked_hidden(
        model, params, tokens, attention_mask, plan.head_mask(c), plan.channel_mask(c), plan.layer_kept(c)
    )
    return unembed(model, params, x)
