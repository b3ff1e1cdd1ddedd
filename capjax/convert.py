"""Moves tensors between transformers' state-dict names and capjax's params, both ways, by the
mapping table (`Family.checkpoint`) of the config's family.

HF Linear weights are [out, in]; capjax kernels are [in, ...out] with head axes split out
(see `capjax.model` for the layout and shape legend).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from capjax.config import ModelConfig
from capjax.families import Rule, family_of


def _rules(c: ModelConfig) -> list[Rule]:
    return family_of(c).checkpoint(c)


def hf_keys(config: ModelConfig) -> set[str]:
    """Every HF state-dict key the config implies (what save_pretrained writes)."""
    keys: set[str] = set()
    for name, *_ in _rules(config):
        keys.update(name.format(i=i) for i in range(config.num_layers)) if "{i}" in name else keys.add(name)
    return keys


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


Place = Callable[[tuple[str, ...], np.ndarray], Any]


def params_from_tensors(
    config: ModelConfig,
    get: Callable[[str], np.ndarray],
    names: set[str],
    dtype: np.dtype,
    place: Place | None = None,
    progress: str | None = None,
) -> dict:
    """Builds the params tree by pulling HF-named tensors one at a time.

    get(name) returns one tensor as numpy; each stacked [L, ...] array is allocated once in the
    target dtype and filled layer by layer. place(path, array) turns each finished leaf into the
    params' array (default: `jnp.asarray`, one device); the host copy is dropped right after,
    so with a `place` that shards (`capjax.io.load_pretrained(mesh=)`) the host holds one leaf
    at a time rather than the whole model. With `progress` (a description), a bar counts the
    tensors read.
    """
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    place = place or (lambda path, a: jnp.asarray(a))
    params: dict = {}
    needed = hf_keys(config)
    missing = sorted(needed - names)
    if missing:
        raise ValueError(
            f"checkpoint lacks tensors the config requires, e.g. {missing[:3]} "
            f"({len(missing)} missing): is the config from this checkpoint?"
        )
    bar = tqdm(total=len(needed), desc=progress, unit="tensor", disable=progress is None, leave=False)

    def read(name: str) -> np.ndarray:
        out = get(name)
        bar.update()
        return out

    for name, path, to_cj, _ in _rules(config):
        paths, split = _paths(path, to_cj)
        if "{i}" in name:
            stacked = None
            for i in range(config.num_layers):
                parts = split(read(name.format(i=i)))
                if stacked is None:
                    stacked = [np.empty((config.num_layers, *a.shape), dtype) for a in parts]
                for s, a in zip(stacked, parts):
                    s[i] = a
            assert stacked is not None  # num_layers >= 1
            for p, s in zip(paths, stacked):
                _set(params, p, place(p, s))
            del stacked
        else:
            for p, a in zip(paths, split(read(name))):
                _set(params, p, place(p, a.astype(dtype)))
    bar.close()
    return params


def _paths(path, to_cj):
    """A rule's capjax paths and its HF -> capjax map returning one array per path. A fused
    checkpoint tensor (Phi-3's qkv_proj) is a rule with a tuple of paths whose maps return and
    take one array per path."""
    if isinstance(path[0], tuple):
        return path, to_cj
    return (path,), lambda w: (to_cj(w),)


def iter_hf_tensors(config: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) pairs, one at a time, for writing safetensors."""
    for name, path, _, to_hf in _rules(config):
        paths = path if isinstance(path[0], tuple) else (path,)
        arrays = [_get(params, p) for p in paths]
        if "{i}" in name:
            for i in range(config.num_layers):
                yield name.format(i=i), np.ascontiguousarray(to_hf(*(np.asarray(a[i]) for a in arrays)))
        else:
            yield name, np.ascontiguousarray(to_hf(*(np.asarray(a) for a in arrays)))


# ---------------------------------------------------------------------------- GGUF names
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


def unpermute_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (pairwise RoPE order -> transformers' half-split).

    llama.cpp's converter stores rows of head h as (d/2, 2) interleaved; transformers expects (2, d/2).
    Works for weights [n_heads * D, E] and biases [n_heads * D].
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
