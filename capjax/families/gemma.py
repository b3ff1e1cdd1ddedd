"""Gemma 2 and Gemma 3 (text): GeGLU MLP, (1 + w) RMSNorms in float32, norms before and after
attention and MLP, queries scaled by query_pre_attn_scalar^-1/2, embeddings scaled by sqrt(E),
tied LM head, sliding-window layers interleaved with global ones. Gemma 2 soft-caps attention
and final logits; Gemma 3 adds per-head q/k norms and gives sliding layers their own RoPE base.

Legend: L layers, D head dim, E hidden. Params: the Llama layout (`capjax.families.llama`,
no biases, no lm_head) plus

    layers/pre_feedforward_layernorm/scale    [L, E]
    layers/post_feedforward_layernorm/scale   [L, E]
    layers/self_attn/q_norm/scale             [L, D]   (Gemma 3)
    layers/self_attn/k_norm/scale             [L, D]   (Gemma 3)

Here post_attention_layernorm normalizes the attention output (not the MLP input, as in Llama).
"""

from __future__ import annotations

from typing import Any

from capjax.families import llama
from capjax.families.base import Family, ModelConfig, Rule, refuse

LAYER_TYPES = ("sliding_attention", "full_attention")


def read_config(c: dict) -> dict:
    """Gemma 2 / Gemma 3 fields; may replace c["rope_parameters"] by the global layers' entry."""
    gemma3 = c["model_type"] == "gemma3_text"
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        refuse("hidden_activation", act, "capjax implements Gemma's GeGLU with gelu_pytorch_tanh only")
    if c.get("attention_bias"):
        refuse("attention_bias", True, "Gemma attention biases are not implemented")
    if c.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", True, "only causal attention is implemented")
    L = int(c["num_hidden_layers"])
    layer_types = c.get("layer_types") or [("sliding_attention" if (i + 1) % 2 else "full_attention") for i in range(L)]
    if len(layer_types) != L or any(t not in LAYER_TYPES for t in layer_types):
        refuse("layer_types", layer_types, f"need {L} entries among {', '.join(LAYER_TYPES)}")
    local_theta = None
    rope = c.get("rope_parameters") or {}
    if gemma3 and set(rope) & set(LAYER_TYPES):
        local = rope.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            refuse(
                "rope_parameters.sliding_attention.rope_type",
                local["rope_type"],
                "Gemma 3's sliding layers use default RoPE in capjax",
            )
        local_theta = float(local.get("rope_theta", 10000.0))
        c["rope_parameters"] = rope.get("full_attention") or {}
    window = c.get("sliding_window")
    return dict(
        hidden_act=act,
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=True,
        qk_norm=gemma3,
        query_pre_attn_scalar=c.get("query_pre_attn_scalar") or 256,  # an int in transformers' configs
        attn_softcap=None if gemma3 else _float(c.get("attn_logit_softcapping")),
        final_softcap=_float(c.get("final_logit_softcapping")),
        layer_types=tuple(layer_types),
        sliding_window=int(window) if window else None,
        local_rope_theta=local_theta,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def write_config(config: ModelConfig, common: dict) -> Any:
    import transformers

    kw = {k: v for k, v in common.items() if k != "hidden_act"}
    assert config.layer_types is not None  # read_config always sets Gemma's layer types
    kw.update(
        head_dim=config.head_dim,
        hidden_activation=config.hidden_act,
        layer_types=list(config.layer_types),
        sliding_window=config.sliding_window,
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        final_logit_softcapping=config.final_softcap,
    )
    if config.model_type == "gemma2":
        cfg: Any = transformers.Gemma2Config(attn_logit_softcapping=config.attn_softcap, **kw)
        cfg.architectures = ["Gemma2ForCausalLM"]
        return cfg
    local = {"rope_type": "default", "rope_theta": config.local_rope_theta or config.rope_theta}
    kw["rope_parameters"] = {"full_attention": kw["rope_parameters"], "sliding_attention": local}
    cfg = transformers.Gemma3TextConfig(**kw)
    cfg.architectures = ["Gemma3ForCausalLM"]
    return cfg


def checkpoint(c: ModelConfig) -> list[Rule]:
    ident = (lambda w: w, lambda a: a)
    norms = ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    rules = llama.checkpoint(c) + [(f"model.layers.{{i}}.{n}.weight", ("layers", n, "scale"), *ident) for n in norms]
    if c.qk_norm:
        rules += [
            (f"model.layers.{{i}}.self_attn.{n}.weight", ("layers", "self_attn", n, "scale"), *ident)
            for n in ("q_norm", "k_norm")
        ]
    return rules


FAMILY = Family(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    read_config=read_config,
    write_config=write_config,
    checkpoint=checkpoint,
    kernels=llama.KERNELS,
    sharding=llama.SHARDING,
)
