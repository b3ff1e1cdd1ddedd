"""Phi-3: the Llama block (SwiGLU, RMSNorm, RoPE, optional sliding window on every layer) whose
checkpoint fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`. They are split on load
into the Llama layout (`capjax.families.llama`), so pruning sees the same seven kernels, and fused
again on export.

Legend: H query heads, K kv heads, D head dim, E hidden, F MLP width.

    model.layers.{i}.self_attn.qkv_proj.weight   [(H + 2 K) D, E]  rows: q, then k, then v
    model.layers.{i}.mlp.gate_up_proj.weight     [2 F, E]          rows: gate, then up
"""

from __future__ import annotations

from typing import Any

import numpy as np

from capjax.families import llama
from capjax.families.base import Family, ModelConfig, Rule, refuse


def read_config(c: dict) -> dict:
    llama.check_swiglu(c)
    llama.check_full_attention(c)
    if c.get("attention_bias"):
        refuse("attention_bias", True, "Phi-3 attention biases are not implemented")
    window = c.get("sliding_window")
    return dict(sliding_window=int(window) if window else None)


def write_config(config: ModelConfig, common: dict) -> Any:
    import transformers

    # transformers' Phi-3 reads an explicit head_dim (a model with heads removed keeps its head_dim).
    return transformers.Phi3Config(sliding_window=config.sliding_window, head_dim=config.head_dim, **common)  # type: ignore[call-arg]


def checkpoint(c: ModelConfig) -> list[Rule]:
    E, F, H, K, D = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    fused = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    rules = [r for r in llama.checkpoint(c) if r[1][-2] not in fused]
    attn = ("layers", "self_attn")

    def split_qkv(w):
        q, k, v = np.split(w, [H * D, (H + K) * D])
        return q.T.reshape(E, H, D), k.T.reshape(E, K, D), v.T.reshape(E, K, D)

    def fuse_qkv(q, k, v):
        return np.concatenate([q.reshape(E, H * D).T, k.reshape(E, K * D).T, v.reshape(E, K * D).T])

    def split_gate_up(w):
        gate, up = np.split(w, [F])
        return gate.T, up.T

    return rules + [
        (
            "model.layers.{i}.self_attn.qkv_proj.weight",
            tuple((*attn, n, "kernel") for n in ("q_proj", "k_proj", "v_proj")),
            split_qkv,
            fuse_qkv,
        ),
        (
            "model.layers.{i}.mlp.gate_up_proj.weight",
            (("layers", "mlp", "gate_proj", "kernel"), ("layers", "mlp", "up_proj", "kernel")),
            split_gate_up,
            lambda gate, up: np.concatenate([gate.T, up.T]),
        ),
    ]


FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    read_config=read_config,
    write_config=write_config,
    checkpoint=checkpoint,
    kernels=llama.KERNELS,
    sharding=llama.SHARDING,
)
