"""The decoder in flax.linen with a per-head mask, layers stacked and scanned: one forward path.

Legend: B batch, T query time, S key time (= T without a cache), L layers, H query heads,
K kv heads, G = H // K query heads per kv head, D head dim, E hidden, F MLP width, V vocab.

Parameters are a plain nested dict (HF names, layers stacked on axis 0, head axes explicit);
the layout is the family's (`capjax.families.llama` lists the Llama one that every family
starts from; e.g. Qwen3 adds layers/self_attn/{q,k}_norm/scale [L, D]).

Query head h reads kv head h // G (transformers' repeat_kv order); K/V are never repeated:
queries are viewed as [B, T, K, G, D]. The head mask multiplies each head's attention output
after attention and before o_proj, exactly where CAP ablates a head.

One forward path: `DecoderLayer` is the only per-layer function, `attention_context` the only
place positions, RoPE tables and attention masks are built, and `scan_layers` (documented in
`capjax.scan`) the only layer scan. `Decoder` runs `scan_layers` over the stacked params (its KV
cache scanned in and out one layer's slice at a time); `layer_context` / `apply_layer` / `scan_layers`
(scoring, patching, Wanda / SparseGPT statistics, recovery) apply the same `DecoderLayer`, so
evaluation, scoring, pruning statistics and generation cannot diverge. Only `init` builds the
params with flax's `nn.scan` (its per-layer random keys, so `init_params` is unchanged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from capjax.config import ModelConfig
from capjax.sites import Interventions, at_site, collect_sites, touches, with_head_mask
from capjax.token_ids import check_token_ids

Array = jax.Array
Params = dict[str, Any]
_INIT = nn.initializers.normal(0.02)


def rms_norm(x: Array, scale: Array, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm as transformers computes it: statistics in float32, scale in the input dtype
    (Llama); with offset, (offset + scale) applied in float32 before the cast (Gemma)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (xf * (offset + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def softcap(x: Array, cap: float | None) -> Array:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x unchanged when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu_pytorch_tanh": partial(nn.gelu, approximate=True),
}


def rope_tables(config: ModelConfig, positions: Array, dtype: Any) -> tuple[Array, Array]:
    """cos, sin [B, T, D] for integer positions [B, T] (half-split layout, as transformers)."""
    inv_freq = jnp.asarray(config.inv_freq(), dtype=jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, N, D] rotated by position; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask_bool(q_slots: Array, k_slots: Array, key_valid: Array, window: int | None) -> Array:
    """Allowed attention [B, T, S]: causal in slot order, real keys only, optional sliding window."""
    allowed = (k_slots[None, :] <= q_slots[:, None])[None] & (key_valid[:, None, :] > 0)
    if window is not None:
        allowed &= (q_slots[:, None] - k_slots[None, :] < window)[None]
    return allowed


def attention_context(
    config: ModelConfig,
    dtype: Any,
    B: int,
    T: int,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    prefix_len: int = 0,
    cache_index: Array | int = 0,
    cache_len: int | None = None,
) -> tuple[Array, ...]:
    """ctx = (cos, sin [B, T, D], mask [B, T, S]): what every layer needs, for T new tokens per row.
    When sliding and global layers alternate (`ModelConfig.mixed_layers`), ctx is the global
    layers' triple followed by the sliding layers' (their window and RoPE base).

    attention_mask [B, T] (1 = real token; right or left padding), or [B, S] over the cache slots
    when cache_len = S is given (the T new tokens sit at slots cache_index ...). Positions default
    to the number of real tokens before each one.
    segment_ids [B, T] (0 = padding) packs several sequences into one row: a token attends only
    to earlier tokens of its own segment; their `positions` [B, T] must be given.
    prefix_len Pf > 0 (with segment_ids): row 0 starts with Pf tokens of segment -1 that precede
    every segment (a shared prefix, computed once); the mask is then [B, T, Pf + T]: keys are
    those Pf prefix tokens, then the row's own T. See `capjax.packing`.
    """
    if config.mixed_layers:
        # Global layers see every earlier key; sliding layers also get their own window and RoPE.
        glob = dataclasses.replace(config, sliding_window=None, layer_types=None)
        local = dataclasses.replace(
            config,
            layer_types=None,
            rope_theta=config.local_rope_theta or config.rope_theta,
            rope_type="default" if config.local_rope_theta else config.rope_type,
        )
        args = (dtype, B, T, attention_mask, positions, segment_ids, prefix_len, cache_index, cache_len)
        return attention_context(glob, *args) + attention_context(local, *args)
    window = config.sliding_window
    if segment_ids is not None:
        key_valid = jnp.asarray(segment_ids)
        if positions is None:
            raise ValueError("segment_ids need their positions (see capjax.packing.pack_examples)")
    elif prefix_len:
        raise ValueError("a shared prefix needs segment_ids and positions (see capjax.packing.pack_examples)")
    else:
        S = T if cache_len is None else cache_len
        key_valid = jnp.ones((B, S), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    if positions is None:
        # Position = number of real tokens before this one: right and left padding alike.
        pos_all = jnp.cumsum(key_valid > 0, axis=-1) - 1
        positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(pos_all, cache_index, T, axis=1), 0)
    cos, sin = rope_tables(config, positions, dtype)
    q_slots = cache_index + jnp.arange(T)
    if not prefix_len:
        k_slots = q_slots if cache_len is None else jnp.arange(cache_len)
        mask = attention_mask_bool(q_slots, k_slots, key_valid, window)
        if segment_ids is not None:
            mask &= key_valid[:, :, None] == key_valid[:, None, :]
        return cos, sin, mask
    seg, pos = key_valid[:, :, None], positions[:, :, None]
    slots = jnp.arange(T)
    own = (key_valid[:, None, :] == seg) & (seg != 0) & (slots[None, None, :] <= slots[None, :, None])
    shared = jnp.broadcast_to(seg > 0, (B, T, prefix_len))  # every example token sees the whole prefix
    mask = jnp.concatenate([shared, own], axis=-1)
    if window is not None:
        key_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(prefix_len), (B, prefix_len)), positions], axis=1)
        mask &= pos - key_pos[:, None, :] < window
    return cos, sin, mask


class Proj(nn.Module):
    """A head-structured linear map: y = einsum(eq, x, kernel) (+ bias). Its input is a named site
    (`capjax.sites.PROJECTION_INPUT`): capture that site to read it (Wanda / SparseGPT statistics)."""

    kernel_shape: tuple[int, ...]
    eq: str
    bias_shape: tuple[int, ...] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _INIT, self.kernel_shape)
        y = jnp.einsum(self.eq, x, kernel.astype(self.dtype))
        if self.bias_shape is not None:
            y = y + self.param("bias", nn.initializers.zeros, self.bias_shape).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        return rms_norm(x, self.param("scale", init, (x.shape[-1],)), self.eps, self.offset)


class Attention(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, rows=None, iv: Interventions | None = None):
        """x [B, T, E], mask [B, T, S] -> ([B, T, E], cache).

        cache: {"k", "v": [B, S, K, D]}; the T new keys are written at slot cache_index.
        Without a cache, S = Pf + T > T means a shared prefix (`capjax.packing`): every row's keys
        are row 0's first Pf keys, then its own T.
        rows [R] (flat indices into B * T): only those query positions go through o_proj -> [1, R, E].
        iv: this layer's `capjax.sites.Interventions` (edits and captures of the attn.* sites; the
        head mask is its attn.z keep); None runs the plain path.
        """
        c = self.config
        E, H, K, D, G = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.group_size
        bias = (lambda *s: s) if c.qkv_bias else (lambda *s: None)
        q = Proj((E, H, D), "bte,ehd->bthd", bias(H, D), self.dtype, name="q_proj")(x)
        k = Proj((E, K, D), "bte,ekd->btkd", bias(K, D), self.dtype, name="k_proj")(x)
        v = Proj((E, K, D), "bte,ekd->btkd", bias(K, D), self.dtype, name="v_proj")(x)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, c.norm_offset, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, c.norm_offset, name="k_norm")(k)
        q, k, v = (at_site(self, iv, f"attn.{n}", a) for n, a in (("q", q), ("k", k), ("v", v)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 1)
            cache = {"k": k, "v": v}
        B, T = x.shape[:2]
        Pf = mask.shape[-1] - T if cache is None else 0
        if Pf > 0:
            k, v = (jnp.concatenate([jnp.broadcast_to(a[:1, :Pf], (B, Pf, K, D)), a], axis=1) for a in (k, v))
        q = q.reshape(B, T, K, G, D)
        scale = (c.query_pre_attn_scalar or D) ** -0.5
        logits = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(self.dtype)) * scale
        logits = softcap(logits.astype(jnp.float32), c.attn_softcap)
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, K, G, T, S]
        if touches(iv, "attn.pattern"):  # viewed as [B, H, T, S] only when asked for
            S = probs.shape[-1]
            probs = at_site(self, iv, "attn.pattern", probs.reshape(B, H, T, S)).reshape(B, K, G, T, S)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype)).reshape(B, T, H, D)
        if rows is not None:
            out = out.reshape(B * T, H, D)[rows][None]
        out = at_site(self, iv, "attn.z", out, rows)
        y = Proj((H, D, E), "bthd,hde->bte", None, self.dtype, name="o_proj")(out)
        return at_site(self, iv, "attn.out", y, rows), cache


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, rows: Array | None = None, iv: Interventions | None = None) -> Array:
        E, F = self.config.hidden_size, self.config.intermediate_size
        gate = Proj((E, F), "bte,ef->btf", None, self.dtype, name="gate_proj")(x)
        up = Proj((E, F), "bte,ef->btf", None, self.dtype, name="up_proj")(x)
        act = _ACTIVATIONS[self.config.hidden_act]
        hidden = at_site(self, iv, "mlp.hidden", act(gate) * up, rows)
        return at_site(
            self, iv, "mlp.out", Proj((F, E), "btf,fe->bte", None, self.dtype, name="down_proj")(hidden), rows
        )


class DecoderLayer(nn.Module):
    """One pre-norm block. Applied alone with one layer's params slice (see `layer_params`)."""

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, iv: Interventions | None, ctx, cache=None, cache_index=None, layer=None, rows=None):
        """x [B, T, E], iv (this layer's `capjax.sites.Interventions` or None), ctx from
        `attention_context` -> ([B, T, E], cache).

        layer: this layer's index (int or traced int32), needed when sliding and global layers
        alternate. rows [R]: compute the output only at these flat positions of B * T -> [1, R, E]
        (keys and values still come from every position). The named sites (`capjax.sites.SITES`)
        are edited / captured as iv says; every site iv does not name costs nothing."""
        c = self.config
        cos, sin, mask = ctx[:3]
        if c.mixed_layers:
            if layer is None:
                raise ValueError(f"{c.model_type} alternates sliding and global layers: pass the layer index")
            sliding = jnp.asarray([t == "sliding_attention" for t in c.layer_types or ()])[layer]
            cos, sin, mask = (jnp.where(sliding, a_local, a) for a, a_local in zip(ctx[:3], ctx[3:]))
        eps, off = c.rms_norm_eps, c.norm_offset
        x = at_site(self, iv, "resid.pre", x)
        normed = at_site(self, iv, "attn.in", RMSNorm(eps, off, name="input_layernorm")(x))
        h, cache = Attention(c, self.dtype, name="self_attn")(normed, cos, sin, mask, cache, cache_index, rows, iv)
        if rows is not None:
            x = x.reshape(-1, x.shape[-1])[rows][None]
        if c.sandwich_norms:
            x = at_site(self, iv, "resid.mid", x + RMSNorm(eps, off, name="post_attention_layernorm")(h), rows)
            normed = at_site(self, iv, "mlp.in", RMSNorm(eps, off, name="pre_feedforward_layernorm")(x), rows)
            h = MLP(c, self.dtype, name="mlp")(normed, rows, iv)
            m = RMSNorm(eps, off, name="post_feedforward_layernorm")(h)
        else:
            x = at_site(self, iv, "resid.mid", x + h, rows)
            normed = at_site(self, iv, "mlp.in", RMSNorm(eps, off, name="post_attention_layernorm")(x), rows)
            m = MLP(c, self.dtype, name="mlp")(normed, rows, iv)
        return at_site(self, iv, "resid.post", x + m, rows), cache


class Decoder(nn.Module):
    """Causal LM: `apply({"params": p}, tokens, head_mask=None, attention_mask=None) -> logits [B, T, V]`;
    its layers run through `scan_layers`, the one layer scan.

    tokens [B, T] int; head_mask [L, H] float (None = no mask: the o_proj input is not touched), an
    intervention on the attn.z site; interventions: a `capjax.sites.Interventions` stacked over
    layers (every leaf [L, ...]) editing / capturing any named site (captures land in the "sites"
    collection: apply with mutable=["sites"], or use `capjax.cache.run_with_cache`);
    attention_mask [B, T] (1 = real token; right or left padding), or [B, S] over cache slots
    when `cache` is given. With `cache` ({"k", "v": [L, B, S, K, D], "index": int32 scalar}),
    returns (logits, new_cache). Logits are float32. positions [B, T] int: the RoPE positions
    (default: the number of real tokens before each token, right and left padding alike).
    """

    config: ModelConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_INIT)
        # Only `init` runs this nn.scan: it creates params["layers"] (stacked [L, ...]) with the same
        # per-layer random keys as ever, so init_params(config, seed) stays bit for bit. Every forward
        # (apply) runs `scan_layers` on those params.
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0, "sites": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, 0, nn.broadcast, 0),
            length=c.num_layers,
        )(c, self.dtype)
        self.norm = RMSNorm(c.rms_norm_eps, c.norm_offset)
        if not c.tie_word_embeddings:
            self.lm_head = Proj((c.hidden_size, c.vocab_size), "bte,ev->btv", None, self.dtype)

    def embed(self, tokens: Array) -> Array:
        """tokens [B, T] -> hidden [B, T, E] in the compute dtype (times sqrt(E) with embed_scale).
        Concrete ids outside the vocabulary are refused (`capjax.token_ids`; traced ones pass)."""
        check_token_ids(tokens, self.config.vocab_size)
        x = self.embed_tokens(tokens).astype(self.dtype)
        return x * jnp.asarray(self.config.hidden_size**0.5, self.dtype) if self.config.embed_scale else x

    def unembed(self, hidden: Array) -> Array:
        """Final norm and LM head: hidden [..., E] -> float32 logits [..., V]."""
        x = self.norm(hidden)
        if self.config.tie_word_embeddings:
            logits = x @ self.embed_tokens.embedding.astype(self.dtype).T
        else:
            squeeze = x.ndim == 2
            logits = self.lm_head(x[None] if squeeze else x)
            logits = logits[0] if squeeze else logits
        return softcap(logits.astype(jnp.float32), self.config.final_softcap)

    def hidden_states(
        self,
        tokens,
        head_mask=None,
        attention_mask=None,
        positions=None,
        cache=None,
        interventions: Interventions | None = None,
    ):
        """The decoder stack without the LM head: (hidden [B, T, E], cache)."""
        c = self.config
        B, T = tokens.shape
        if head_mask is not None and head_mask.shape != (c.num_layers, c.num_heads):
            raise ValueError(
                f"head_mask has shape {tuple(head_mask.shape)}, expected [L, H] = "
                f"[{c.num_layers}, {c.num_heads}] (vmap over a leading axis for batches of masks)"
            )
        iv = with_head_mask(interventions, None if head_mask is None else head_mask.astype(self.dtype))
        index = cache["index"] if cache is not None else 0
        ctx = attention_context(
            c,
            self.dtype,
            B,
            T,
            attention_mask,
            positions,
            cache_index=index,
            cache_len=None if cache is None else cache["k"].shape[2],
        )
        x = self.embed(tokens)
        kv: Any = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        if self.is_initializing():
            x, kv = self.layers(x, iv, ctx, kv, index, jnp.arange(c.num_layers))
        else:
            # The stacked layer params are the scan's xs (as nn.scan had them): autodiff through the
            # stack stacks their cotangents per layer.
            params: Any = self.variables["params"]
            capture = iv is not None and bool(iv.capture)
            out = scan_layers(
                self,
                params,
                x,
                ctx,
                iv=iv,
                collect="sites" if capture else None,
                layers=(params["layers"], _same),
                kv=kv,
                cache_index=index,
            )
            if kv is not None:
                x, sites, kv = out
            else:
                x, sites = out if capture else (out, None)
            for site, value in (sites or {}).items():  # [L, ...]: run_with_cache reads them back
                self.sow("sites", site, value)
        new_cache = None if cache is None else {**kv, "index": index + T}
        return x, new_cache

    def __call__(
        self,
        tokens,
        head_mask=None,
        attention_mask=None,
        positions=None,
        cache=None,
        interventions: Interventions | None = None,
    ):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T] integers, got shape {tuple(tokens.shape)}")
        x, new_cache = self.hidden_states(tokens, head_mask, attention_mask, positions, cache, interventions)
        logits = self.unembed(x)
        return logits if cache is None else (logits, new_cache)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """An empty KV cache: k, v [L, B, S, K, D] zeros and index 0."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


def layer_params(params: Params, layer: int | Array) -> Params:
    """One layer's params (the slice `DecoderLayer` expects) from the stacked tree; layer [] is an
    int or a traced int32 scalar."""
    return jax.tree.map(lambda a: a[layer], params["layers"])


def init_params(config: ModelConfig, seed: int = 0, dtype: Any = jnp.float32) -> Params:
    """Random params (normal 0.02, norms 1) with the layout above; shapes only need the config."""
    model = Decoder(config)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))["params"]
    return jax.tree.map(lambda a: a.astype(dtype), params)


def param_shapes(config: ModelConfig) -> Params:
    """The params tree as ShapeDtypeStructs, without allocating anything."""
    model = Decoder(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]


def numpy_dtype(dtype: Any) -> np.dtype:
    """'float32' / 'bfloat16' / jnp dtypes -> a numpy dtype (bfloat16 via ml_dtypes)."""
    return np.dtype(jnp.dtype(dtype))


# ---------------------------------------------------------------------------- layer by layer
# Sequential algorithms (prefix reuse, Wanda, SparseGPT) walk the stack one layer at a time.


def layer_context(
    model: Decoder,
    params: Params,
    tokens: Array,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    prefix_len: int = 0,
):
    """(embeddings [B, T, E], ctx) where ctx = (cos, sin, mask) is what every layer needs.

    segment_ids [B, T] (0 = padding) packs several sequences into one row: a token attends only
    to earlier tokens of its own segment; pass their `positions` [B, T] (restarting at 0 in each
    segment) with them. See `capjax.packing`.

    prefix_len Pf > 0 (with segment_ids): row 0 starts with Pf tokens of segment -1 that precede
    every segment (a shared prefix, computed once); the others' positions start at Pf. The mask is
    then [B, T, Pf + T]: keys are those Pf prefix tokens, then the row's own T.
    """
    B, T = tokens.shape
    ctx = attention_context(model.config, model.dtype, B, T, attention_mask, positions, segment_ids, prefix_len)
    return model.apply({"params": params}, tokens, method=Decoder.embed), ctx


def apply_layer(
    model: Decoder,
    layer_p: Params,
    x: Array,
    ctx,
    iv: Interventions | None = None,
    *,
    rows: Array | None = None,
    layer: int | Array | None = None,
):
    """Runs one decoder layer: x [B, T, E] -> x [B, T, E].

    iv: this layer's `capjax.sites.Interventions` (edits of any named site; a head mask [H] is
    `capjax.sites.with_head_mask(iv, head_mask)`, an attn.z keep); None is the plain path.
    layer: the layer's index (int or traced int32); required by families whose sliding and global
    layers alternate (`ModelConfig.mixed_layers`), ignored otherwise.

    With rows [R] (flat indices into B * T), only those positions' outputs -> [R, E] (the last
    layer, when the loss reads only some positions). When iv captures sites (and rows is not
    given), returns (x, {site: value}); every projection's input is a site
    (`capjax.sites.PROJECTION_INPUT`)."""
    if iv is not None and not isinstance(iv, Interventions):
        raise TypeError(
            f"apply_layer's iv must be capjax.sites.Interventions, got {type(iv).__name__}: a head mask [H] "
            "goes in as iv=capjax.sites.with_head_mask(None, head_mask)"
        )
    if rows is not None:
        module = DecoderLayer(model.config, model.dtype, parent=None)
        return module.apply({"params": layer_p}, x, iv, ctx, layer=layer, rows=rows)[0][0]
    x, _, sites = _layer(model, layer_p, x, ctx, iv, layer)
    return x if sites is None else (x, sites)


def _layer(model: Decoder, layer_p: Params, x: Array, ctx, iv, layer, kv=None, cache_index=None):
    """One layer -> (x [B, T, E], kv, {site: value} or None when iv captures nothing). kv: this
    layer's {"k", "v": [B, S, K, D]} cache (the T new keys written at slot cache_index) or None.
    The module is unbound (parent=None), so a bound `Decoder` may call this in its own forward."""
    module, args = DecoderLayer(model.config, model.dtype, parent=None), (x, iv, ctx, kv, cache_index)
    if iv is not None and iv.capture:
        (x, kv), state = module.apply({"params": layer_p}, *args, layer=layer, mutable=["sites"])
        return x, kv, collect_sites(state["sites"])
    x, kv = module.apply({"params": layer_p}, *args, layer=layer)
    return x, kv, None


def _same(tree):
    return tree


COLLECT = (None, "inputs", "sites")


def scan_layers(
    model: Decoder,
    params: Params,
    x: Array,
    ctx,
    start: int | Array = 0,
    stop: int | Array | None = None,
    iv: Interventions | None = None,
    *,
    collect: str | Callable | None = None,
    layers: tuple[Any, Callable] | None = None,
    remat: bool = False,
    constrain: Callable[[Array], Array] | None = None,
    kv: dict[str, Array] | None = None,
    cache_index: Array | int = 0,
):
    """The one layer scan (documented with examples in `capjax.scan`, its public home): layers
    start .. stop - 1 (default all L) on x [B, T, E] -> x [B, T, E]; with `collect`, (x, ys) where
    ys is stacked over the n = stop - start layers run; with `kv`, (x, ys, kv) (ys None without
    `collect`).

    start / stop: ints, or traced int32 (then the loop is a while loop; `collect`, `layers`,
    `remat` and `kv` need static bounds). iv: interventions stacked over the L layers (every leaf
    [L, ...]; layer l runs iv.at(l)) or None (the plain path, bit for bit).
    collect: "inputs": ys = every layer's input [n, B, T, E]; "sites": ys = the sites iv captures,
    {site: [n, ...]}; a function f(x_in, x_out, sites) -> pytree: its per-layer result (a
    reduction of the captured sites, say, so that nothing [n, B, T, ...] is kept), stacked.
    layers: (tree, fn) scans over the leading axis [n] of a stacked tree with fn(slice) as each
    layer's params (recovery's trainable / masked layers; `Decoder` passes params["layers"]
    itself, so that they are the scan's xs) instead of indexing params["layers"].
    remat: recompute each layer in the backward pass (`jax.checkpoint`). constrain: applied to
    every layer's output (a sharding constraint).
    kv: the KV cache of the layers run, {"k", "v": [n, B, S, K, D]}, scanned one layer's slice at a
    time (the T new keys and values written at slot cache_index of each) and returned updated."""
    if not (collect in COLLECT or callable(collect)):
        raise ValueError(f"collect must be one of {COLLECT} or a function, got {collect!r}")
    if collect == "sites" and not (iv is not None and iv.capture):
        raise ValueError("collect='sites' needs interventions that capture sites (Interventions(capture={...}))")
    stop = model.config.num_layers if stop is None else stop

    def layer(x, l, lp, iv_l, kv_l):
        y, kv_l, sites = _layer(model, lp, x, ctx, iv_l, l, kv_l, cache_index)
        return (y if constrain is None else constrain(y)), kv_l, sites

    if collect is None and layers is None and not remat and kv is None:
        at = (lambda l: None) if iv is None else iv.at
        return jax.lax.fori_loop(start, stop, lambda l, x: layer(x, l, layer_params(params, l), at(l), None)[0], x)

    def body(x, item):
        l, tree, iv_l, kv_l = item
        lp = layer_params(params, l) if layers is None else layers[1](tree)
        y, kv_l, sites = layer(x, l, lp, iv_l, kv_l)
        if callable(collect):
            return y, (collect(x, y, sites), kv_l)
        return y, ({"inputs": x, "sites": sites}.get(collect), kv_l)

    tree = None if layers is None else layers[0]
    # iv's per-layer slices are the scan's xs (autodiff then stacks their cotangents per layer).
    ivs = None if iv is None else jax.tree.map(lambda a: a[start:stop], iv)
    xs = (jnp.arange(start, stop), tree, ivs, kv)
    x, (ys, kv) = jax.lax.scan(jax.checkpoint(body) if remat else body, x, xs)
    if kv is not None:
        return x, ys, kv
    return x if collect is None else (x, ys)


VOCAB_CHUNK = 4096  # token_nll's vocabulary chunk; capjax.memory counts [A, VOCAB_CHUNK] logits


def unembed(model: Decoder, params: Params, hidden: Array) -> Array:
    """Final norm + LM head on hidden states [..., E] -> float32 logits [..., V]."""
    logits: Any = model.apply({"params": params}, hidden, method=Decoder.unembed)  # flax: Any | (out, state)
    return logits


def token_nll(model: Decoder, params: Params, hidden: Array, target: Array, vocab_chunk: int = VOCAB_CHUNK) -> Array:
    """-log p(target) [R] from final hidden states [R, E] (before the final norm) and targets [R].

    Equal to -log_softmax(unembed(hidden))[target] without building the [R, V] logits: an online
    logsumexp over vocabulary chunks of `vocab_chunk` columns, whose logits stay in cache. Logits
    are float32, as in `unembed`.
    """
    c = model.config
    x = rms_norm(hidden, params["norm"]["scale"], c.rms_norm_eps, c.norm_offset)
    tied = c.tie_word_embeddings
    w = params["embed_tokens"]["embedding"] if tied else params["lm_head"]["kernel"]  # [V, E] or [E, V]
    w = w.astype(model.dtype)
    V, R = c.vocab_size, hidden.shape[0]
    C = min(vocab_chunk, V)
    n = -(-V // C)

    def step(i, carry):
        m, s, t = carry
        # The last chunk is clamped to end at V (no padded copy of the LM head); columns before
        # i * C were counted by the previous chunk and are masked out.
        start = jnp.minimum(i * C, V - C)
        wc = jax.lax.dynamic_slice_in_dim(w, start, C, axis=0 if tied else 1)
        z = softcap((x @ (wc.T if tied else wc)).astype(jnp.float32), c.final_softcap)  # [R, C]
        z = jnp.where(start + jnp.arange(C) >= i * C, z, -jnp.inf)
        m_new = jnp.maximum(m, z.max(axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=-1)
        local = target - i * C
        hit = (local >= 0) & (local < C)
        t = t + jnp.where(hit, jnp.take_along_axis(z, jnp.clip(target - start, 0, C - 1)[:, None], axis=-1)[:, 0], 0.0)
        return m_new, s, t

    init = (jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32), jnp.zeros((R,), jnp.float32))
    m, s, t = jax.lax.fori_loop(0, n, step, init)
    return m + jnp.log(s) - t
