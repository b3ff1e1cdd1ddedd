"""What a model family declares: the one place capjax learns an architecture.

Legend: L layers, H query heads, K kv heads, D head dim, E hidden, F MLP width, V vocab.

A `Family` holds
  - `read_config(c)`: the family-specific ModelConfig fields from a transformers config dict
    (biases, windows, block options), refusing by name any field it does not implement;
  - `write_config(config, common)`: the transformers config object back (for save_pretrained),
    given the keyword arguments every family shares (sizes, RoPE, token ids);
  - `checkpoint(config)`: `Rule`s mapping transformers state-dict names to param paths, both ways;
  - `kernels`: the prunable kernels, with their input axes and the axis that indexes a head;
  - `sharding`: (path regex, PartitionSpec entries) rules over the params tree;
  - `mlp_width_activations`: F-wide activations per token an MLP keeps live (memory estimate).
Everything else (pruning importance, structured pruning, sharding, memory, convert) reads these.
The block itself (norms, activation, qk-norm, ...) is switched by ModelConfig fields the family's
`read_config` sets, and computed by the one per-layer function in `capjax.model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

DATA, MODEL = "data", "model"


class ModelConfig(Protocol):
    """The fields of a `capjax.config.ModelConfig` that families read. Families sit below
    config (which picks a family by model_type), so they name this shape instead of importing
    the class; `capjax.config.ModelConfig` satisfies it (tests/test_layers.py checks it does)."""

    @property
    def model_type(self) -> str: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def qkv_bias(self) -> bool: ...
    @property
    def qk_norm(self) -> bool: ...
    @property
    def hidden_act(self) -> str: ...
    @property
    def query_pre_attn_scalar(self) -> float | None: ...
    @property
    def attn_softcap(self) -> float | None: ...
    @property
    def final_softcap(self) -> float | None: ...
    @property
    def layer_types(self) -> tuple[str, ...] | None: ...
    @property
    def local_rope_theta(self) -> float | None: ...
    @property
    def tie_word_embeddings(self) -> bool: ...
    @property
    def sliding_window(self) -> int | None: ...


# (HF name with {i} for the layer, capjax path, HF -> capjax, capjax -> HF); per-layer entries map
# one layer's slice of the stacked [L, ...] array. A fused HF tensor gives a tuple of paths: its
# HF -> capjax map returns one array per path and its capjax -> HF map takes them in that order.
Rule = tuple[str, tuple[str, ...] | tuple[tuple[str, ...], ...], Callable, Callable]


class UnsupportedConfigError(ValueError):
    """A transformers config asks for computation capjax does not implement."""


def refuse(field: str, value: Any, why: str) -> None:
    """Raises UnsupportedConfigError naming the config field."""
    raise UnsupportedConfigError(f"config field {field}={value!r} is not supported: {why}")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A prunable kernel of the stacked params tree.

    path: '/'-joined path, e.g. "layers/self_attn/q_proj/kernel".
    n_in: how many axes after the layer axis are input axes (HF's [out, in] view is the
        kernel reshaped to [L, prod(in), prod(out)] and transposed).
    heads: "query" (the axis indexes the H query heads), "kv" (the K kv heads) or None (not
        head-structured: CAP weighs it by the layer's mean head importance).
    head_axis: the axis of the stacked [L, ...] kernel that indexes those heads.
    """

    path: str
    n_in: int
    heads: str | None = None
    head_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family; see the module docstring for what each field means."""

    name: str
    model_types: tuple[str, ...]
    read_config: Callable[[dict], dict]
    write_config: Callable[[ModelConfig, dict], Any]
    checkpoint: Callable[[ModelConfig], list[Rule]]
    kernels: tuple[Kernel, ...]
    sharding: tuple[tuple[str, tuple[str | None, ...]], ...]
    mlp_width_activations: int = 3

    def kernel(self, path: str) -> Kernel:
        for k in self.kernels:
            if k.path == path:
                return k
        raise KeyError(f"{path!r} is not a prunable kernel of the {self.name} family")

    def head_kernels(self, heads: str) -> tuple[Kernel, ...]:
        """The prunable kernels whose `head_axis` indexes `heads` ("query" or "kv")."""
        return tuple(k for k in self.kernels if k.heads == heads)
