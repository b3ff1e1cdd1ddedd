"""The dense model with a `Plan`'s removal applied as masks: the oracle `shrink` must equal.

Legend: B batch, T time, L layers, H query heads, F MLP width, E hidden, V vocab.

Removed heads are zeroed before o_proj by the head mask (an attn.z keep, `capjax.sites`); removed
MLP channels by multiplying down_proj's rows (the channel's activation times zero); removed layers
are skipped: their attention and MLP outputs are zeroed (attn.out, mlp.out keeps), so the residual
stream passes them unchanged, bit for bit (a sandwich family's post-norms of zero are zero). All
of it runs on the one layer scan (`capjax.scan.scan_layers`). Layers keep their index, so Gemma's
sliding and global layers keep their attention type.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from capjax.model import Decoder, layer_context, unembed
from capjax.scan import scan_layers
from capjax.sites import Edit, Interventions
from capjax.structured.plan import Plan
from capjax.token_ids import check_token_ids

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
    tokens = jnp.asarray(tokens)
    check_token_ids(tokens, c.vocab_size)  # concrete here: refused before the jitted run
    am = None if attention_mask is None else jnp.asarray(attention_mask)
    kept = jnp.ones(c.num_layers, model.dtype) if layer_kept is None else jnp.asarray(layer_kept, model.dtype)
    return _masked_hidden(model, params, tokens, am, hm, kept)


@partial(jax.jit, static_argnames=("model",))
def _masked_hidden(model: Decoder, params: Params, tokens, attention_mask, head_mask, kept) -> jax.Array:
    """The one layer scan with head_mask [L, H] as attn.z's keep and layer l's attention and MLP
    outputs kept by kept[l] (0: both zero, the layer's output is its input exactly)."""
    x, ctx = layer_context(model, params, tokens, attention_mask)
    skip = Edit(keep=kept)  # [L]: a scalar keep per layer
    iv = Interventions({"attn.z": Edit(keep=head_mask), "attn.out": skip, "mlp.out": skip})
    return scan_layers(model, params, x, ctx, iv=iv)


def masked_logits(model: Decoder, params: Params, plan: Plan, tokens, attention_mask=None) -> jax.Array:
    """Logits [B, T, V] of the dense model under the plan's masks."""
    c = model.config
    x = masked_hidden(
        model, params, tokens, attention_mask, plan.head_mask(c), plan.channel_mask(c), plan.layer_kept(c)
    )
    return unembed(model, params, x)
