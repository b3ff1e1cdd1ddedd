"""Qwen3: the Llama block with an RMSNorm over each query and key head (before RoPE).

Legend: L layers, D head dim. Params: the Llama layout (`capjax.families.llama`) plus

    layers/self_attn/q_norm/scale             [L, D]
    layers/self_attn/k_norm/scale             [L, D]

head_dim is free (not hidden_size / heads). attention_bias (q/k/v/o biases) is refused.
"""

from __future__ import annotations

from typing import Any

from capjax.families import llama
from capjax.families.base import Family, ModelConfig, Rule, refuse


def read_config(c: dict) -> dict:
    llama.check_swiglu(c)
    if c.get("use_sliding_window"):
        refuse("use_sliding_window", True, "Qwen3's per-layer sliding window is not implemented; set it to false")
    llama.check_full_attention(c)
    if c.get("attention_bias"):
        # Qwen3's attention_bias also adds an o_proj bias; released Qwen3 checkpoints have none.
        refuse("attention_bias", True, "Qwen3 attention biases (q/k/v/o) are not implemented")
    return dict(qk_norm=True, sliding_window=None)


def write_config(config: ModelConfig, common: dict) -> Any:
    import transformers

    return transformers.Qwen3Config(head_dim=config.head_dim, use_sliding_window=False, **common)


def checkpoint(c: ModelConfig) -> list[Rule]:
    ident = (lambda w: w, lambda a: a)
    return llama.checkpoint(c) + [
        (f"model.layers.{{i}}.self_attn.{n}.weight", ("layers", "self_attn", n, "scale"), *ident)
        for n in ("q_norm", "k_norm")
    ]


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    read_config=read_config,
    write_config=write_config,
    checkpoint=checkpoint,
    kernels=llama.KERNELS,
    sharding=llama.SHARDING,
)
