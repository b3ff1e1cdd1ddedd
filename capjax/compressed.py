"""Sparse export in the compressed-tensors format (what llm-compressor writes and vLLM reads).

The seven prunable matrices of every layer (q/k/v/o, gate/up/down; HF [out, in]) are stored
by the compressed-tensors library's own sparsity compressors:

    sparse-24-bitmask   when every one of them is 2:4 along `in` (at most 2 nonzeros in each
                        group of 4): the kept values [out, in/2] and a packed bitmask
    sparse-bitmask      otherwise (unstructured): the nonzeros, a packed bitmask, row offsets

and config.json gets `quantization_config` with the `sparsity_config` written by
`ModelCompressor.update_config`. Embeddings, norms and lm_head stay dense.

The sparsity compressors live in compressed-tensors <= 0.13 (0.14 pins transformers < 5;
0.15 removed them), hence the `compressed` extra's pin. Readers: that library (and capjax);
transformers 5 asks for compressed-tensors >= 0.15 to load any compressed-tensors folder, and
vLLM dropped sparse-24 support (vllm-project/vllm#36799, 2026), so for serving today write the
default dense folder; this format is the compact archive of a pruned model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from capjax.config import ModelConfig
from capjax.convert import iter_hf_tensors

# The HF module names capjax prunes (one per layer each): the compression targets.
PRUNABLE_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
FORMATS = ("sparse-24-bitmask", "sparse-bitmask")


class SparsityFormatError(ValueError):
    """The weights do not have the sparsity pattern the requested format stores."""


def _import():
    try:
        import torch
        from compressed_tensors.compressors import BaseCompressor, ModelCompressor
        from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    except ImportError as e:
        raise ImportError(
            f"compressed-tensors export needs `pip install capjax[compressed]` "
            f"(compressed-tensors<=0.13 and torch): {e}"
        ) from e
    try:
        from compressed_tensors.compressors import Sparse24BitMaskCompressor  # noqa: F401
    except ImportError as e:  # 0.15+ dropped the sparsity compressors
        import compressed_tensors

        raise ImportError(
            f"compressed-tensors {compressed_tensors.__version__} has no sparsity compressors; "
            "install compressed-tensors==0.13.0 (pip install capjax[compressed])"
        ) from e
    return torch, BaseCompressor, ModelCompressor, BitmaskConfig, Sparse24BitMaskConfig


def is_target(name: str) -> bool:
    """Whether HF tensor `name` is a prunable matrix (a compression target)."""
    return name.endswith(".weight") and any(f".{m}.weight" in name for m in PRUNABLE_MODULES)


def is_24(w: np.ndarray) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive `in` entries of w [out, in]."""
    if w.shape[-1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _torch(torch, a: np.ndarray):
    if a.dtype.name == "bfloat16":  # ml_dtypes bfloat16: torch cannot wrap it directly
        return torch.from_numpy(np.array(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))  # a copy: jax's host arrays are read-only


def choose_format(config: ModelConfig, params: dict, structure: str | None = None) -> tuple[str, float]:
    """(format, global sparsity of the targets). structure None picks 2:4 when every target
    is 2:4, else unstructured; "2:4" raises SparsityFormatError naming a tensor that is not."""
    if structure not in (None, "2:4", "unstructured"):
        raise ValueError(f"structure={structure!r}: use None (detect), '2:4' or 'unstructured'")
    zeros = total = 0
    not_24 = None
    for name, w in iter_hf_tensors(config, params):
        if not is_target(name):
            continue
        zeros += int((w == 0).sum())
        total += w.size
        if not_24 is None and not is_24(w):
            not_24 = name
    if structure == "2:4" and not_24 is not None:
        raise SparsityFormatError(
            f"{not_24} is not 2:4 sparse along its input axis: prune with nm='2:4' "
            "or export with structure='unstructured'"
        )
    fmt = "sparse-bitmask" if structure == "unstructured" or not_24 is not None else "sparse-24-bitmask"
    return fmt, zeros / max(total, 1)


def _compressed_tensors(config: ModelConfig, params: dict, compressor, torch) -> Iterator[tuple[str, Any]]:
    for name, w in iter_hf_tensors(config, params):
        t = _torch(torch, w)
        if is_target(name):
            yield from compressor.compress({name: t}, compression_targets={name[: -len(".weight")]}).items()
        else:
            yield name, t


def save_compressed(
    model,
    params: dict,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    structure: str | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Writes an HF folder whose prunable matrices are stored by compressed-tensors.

    transformers (with compressed-tensors installed) and vLLM load it as a dense model;
    `capjax.load_pretrained` reads it back too. Returns the folder.
    """
    import jax
    from safetensors.torch import save_file

    torch, BaseCompressor, ModelCompressor, BitmaskConfig, Sparse24BitMaskConfig = _import()
    config: ModelConfig = model.config
    fmt, sparsity = choose_format(config, params, structure)
    cfg_cls = Sparse24BitMaskConfig if fmt == "sparse-24-bitmask" else BitmaskConfig
    sconfig = cfg_cls(
        global_sparsity=sparsity,
        targets=["Linear"],
        ignore=["lm_head"],
        sparsity_structure="2:4" if fmt == "sparse-24-bitmask" else "unstructured",
    )
    compressor = BaseCompressor.load_from_registry(fmt, config=sconfig)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    hf_config = config.to_hf()
    leaf_dtype = jax.tree.leaves(params)[0].dtype
    hf_config.dtype = "bfloat16" if leaf_dtype.name == "bfloat16" else "float32"
    hf_config.save_pretrained(out)
    ModelCompressor(sparsity_config=sconfig).update_config(str(out))

    parts: list[dict[str, Any]] = [{}]
    size = 0
    for name, t in _compressed_tensors(config, params, compressor, torch):
        nbytes = t.numel() * t.element_size()
        if parts[-1] and size + nbytes > max_shard_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = t.contiguous()
        size += nbytes
    if len(parts) == 1:
        save_file(parts[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
        for part, fname in zip(parts, names):
            save_file(part, str(out / fname), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: fname for part, fname in zip(parts, names) for k in part}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def is_compressed_folder(folder: str | os.PathLike) -> bool:
    """Whether folder/config.json declares a compressed-tensors sparsity_config."""
    p = Path(folder) / "config.json"
    if not p.exists():
        return False
    q = json.loads(p.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "compressed-tensors" and bool(q.get("sparsity_config"))


def decompressed_tensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every HF tensor of a compressed-tensors folder, dense, as numpy (float32 for bfloat16),
    decompressed by the compressed-tensors library. Refuses quantized folders."""
    _import()
    from compressed_tensors.compressors import ModelCompressor

    folder = Path(folder)
    mc = ModelCompressor.from_pretrained(str(folder))
    if mc is None or mc.sparsity_compressor is None:
        raise ValueError(f"{folder / 'config.json'} has no compressed-tensors sparsity_config")
    if mc.quantization_config is not None:
        raise ValueError(
            f"{folder} is quantized (quantization_config.config_groups); capjax reads "
            "sparse-only compressed-tensors folders: decompress it with llm-compressor first"
        )
    out = {}
    for name, t in mc.sparsity_compressor.decompress(str(folder)):
        out[name] = t.float().numpy() if t.dtype.is_floating_point else t.numpy()
    return out
