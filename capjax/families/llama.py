"""Llama, Mistral and Qwen2: pre-norm RMSNorm blocks, SwiGLU MLP, RoPE, separate q/k/v/o.

Legend: L layers, H query heads, K kv heads, D head dim, E hidden, F MLP width, V vocab.

Params (stacked over L; the layout every other family starts from):

    embed_tokens/embedding                    [V, E]
    layers/input_layernorm/scale              [L, E]
    layers/self_attn/q_proj/kernel (, bias)   [L, E, H, D] ([L, H, D], Qwen2)
    layers/self_attn/k_proj/kernel (, bias)   [L, E, K, D] ([L, K, D])
    layers/self_attn/v_proj/kernel (, bias)   [L, E, K, D] ([L, K, D])
    layers/self_attn/o_proj/kernel            [L, H, D, E]
    layers/post_attention_layernorm/scale     [L, E]
    layers/mlp/gate_proj/kernel               [L, E, F]
    layers/mlp/up_proj/kernel                 [L, E, F]
    layers/mlp/down_proj/kernel               [L, F, E]
    norm/scale                                [E]
    lm_head/kernel                            [E, V]   (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Any

from capjax.families.base import DATA, MODEL, Family, Kernel, ModelConfig, Rule, refuse

KERNELS = (
    Kernel("layers/self_attn/q_proj/kernel", 1, "query", 2),  # [L, E, H, D]
    Kernel("layers/self_attn/k_proj/kernel", 1, "kv", 2),  # [L, E, K, D]
    Kernel("layers/self_attn/v_proj/kernel", 1, "kv", 2),  # [L, E, K, D]
    Kernel("layers/self_attn/o_proj/kernel", 2, "query", 1),  # [L, H, D, E]
    Kernel("layers/mlp/gate_proj/kernel", 1),  # [L, E, F]
    Kernel("layers/mlp/up_proj/kernel", 1),  # [L, E, F]
    Kernel("layers/mlp/down_proj/kernel", 1),  # [L, F, E]
)

SHARDING = (
    (r"embed_tokens/embedding$", (MODEL, DATA)),  # [V, E]
    (r"lm_head/kernel$", (DATA, MODEL)),  # [E, V]
    (r"self_attn/(q|k|v)_proj/kernel$", (None, DATA, MODEL, None)),  # [L, E, H|K, D]
    (r"self_attn/(q|k|v)_proj/bias$", (None, MODEL, None)),  # [L, H|K, D]
    (r"self_attn/o_proj/kernel$", (None, MODEL, None, DATA)),  # [L, H, D, E]
    (r"mlp/(gate|up)_proj/kernel$", (None, DATA, MODEL)),  # [L, E, F]
    (r"mlp/down_proj/kernel$", (None, MODEL, DATA)),  # [L, F, E]
    (r".*", ()),  # norms: replicated
)


def check_swiglu(c: dict) -> None:
    """Refuses an MLP other than bias-free SwiGLU with silu."""
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        refuse("hidden_act", act, "capjax implements SwiGLU with silu only")
    if c.get("mlp_bias"):
        refuse("mlp_bias", True, "MLP biases are not implemented")


def check_full_attention(c: dict) -> None:
    """Refuses per-layer attention types other than full attention."""
    layer_types = c.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "only full attention layers are implemented")


def read_config(c: dict) -> dict:
    """Llama / Mistral / Qwen2 fields of ModelConfig; refuses what they do not implement."""
    model_type = c["model_type"]
    check_swiglu(c)
    # pretraining_tp only split matmuls in old transformers; it never changed the result.
    if model_type == "qwen2":
        qkv_bias = c.get("attention_bias") is not False
        if c.get("use_sliding_window"):
            refuse("use_sliding_window", True, "Qwen2's per-layer sliding window is not implemented; set it to false")
        sliding_window = None
    else:
        qkv_bias = bool(c.get("attention_bias", False))
        sliding_window = c.get("sliding_window") if model_type == "mistral" else None
    if model_type != "mistral":
        check_full_attention(c)
    if c.get("attention_bias") and model_type != "qwen2":
        # Llama's attention_bias also adds an o_proj bias.
        refuse("attention_bias", True, "Llama attention biases (q/k/v/o) are not implemented")
    return dict(qkv_bias=qkv_bias, sliding_window=int(sliding_window) if sliding_window else None)


def write_config(config: ModelConfig, common: dict) -> Any:
    import transformers

    if config.model_type == "llama":
        return transformers.LlamaConfig(head_dim=config.head_dim, **common)
    if config.model_type == "mistral":
        return transformers.MistralConfig(head_dim=config.head_dim, sliding_window=config.sliding_window, **common)
    # transformers' Qwen2 reads an explicit head_dim (a model with heads removed keeps its head_dim).
    return transformers.Qwen2Config(use_sliding_window=False, head_dim=config.head_dim, **common)  # type: ignore[call-arg]


def checkpoint(c: ModelConfig) -> list[Rule]:
    """transformers state-dict names <-> param paths (HF Linear weights are [out, in])."""
    E, H, K, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    ident = (lambda w: w, lambda a: a)
    rules: list[Rule] = [
        ("model.embed_tokens.weight", ("embed_tokens", "embedding"), *ident),
        ("model.norm.weight", ("norm", "scale"), *ident),
        ("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), *ident),
        ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"), *ident),
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            ("layers", "self_attn", "q_proj", "kernel"),
            lambda w: w.T.reshape(E, H, D),
            lambda a: a.reshape(E, H * D).T,
        ),
        (
            "model.layers.{i}.self_attn.k_proj.weight",
            ("layers", "self_attn", "k_proj", "kernel"),
            lambda w: w.T.reshape(E, K, D),
            lambda a: a.reshape(E, K * D).T,
        ),
        (
            "model.layers.{i}.self_attn.v_proj.weight",
            ("layers", "self_attn", "v_proj", "kernel"),
            lambda w: w.T.reshape(E, K, D),
            lambda a: a.reshape(E, K * D).T,
        ),
        (
            "model.layers.{i}.self_attn.o_proj.weight",
            ("layers", "self_attn", "o_proj", "kernel"),
            lambda w: w.T.reshape(H, D, E),
            lambda a: a.reshape(H * D, E).T,
        ),
        (
            "model.layers.{i}.mlp.gate_proj.weight",
            ("layers", "mlp", "gate_proj", "kernel"),
            lambda w: w.T,
            lambda a: a.T,
        ),
        ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), lambda w: w.T, lambda a: a.T),
        (
            "model.layers.{i}.mlp.down_proj.weight",
            ("layers", "mlp", "down_proj", "kernel"),
            lambda w: w.T,
            lambda a: a.T,
        ),
    ]
    if c.qkv_bias:
        for name, n in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
            rules.append(
                (
                    f"model.layers.{{i}}.self_attn.{name}.bias",
                    ("layers", "self_attn", name, "bias"),
                    lambda w, n=n: w.reshape(n, D),
                    lambda a: a.reshape(-1),
                )
            )
    if not c.tie_word_embeddings:
        rules.append(("lm_head.weight", ("lm_head", "kernel"), lambda w: w.T, lambda a: a.T))
    return rules


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    read_config=read_config,
    write_config=write_config,
    checkpoint=checkpoint,
    kernels=KERNELS,
    sharding=SHARDING,
)
