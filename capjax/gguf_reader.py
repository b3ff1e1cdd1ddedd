"""A GGUF file read without torch: config, tokenizer and tensors.

transformers reads GGUF config, tokenizer and tensors only with torch installed
(`transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint` and
`transformers.integrations.gguf.reader` import it). The same work is done here with the `gguf`
package's numpy `GGUFReader` and transformers' own torch-free tables: the config keys from
`transformers.integrations.ggml.GGUF_CONFIG_MAPPING`, the tokenizer from
`transformers.integrations.gguf.convert_gguf_tokenizer`. tests/test_gguf_reader.py checks that
the results equal transformers' (config dict, token ids, params bit for bit).

Shapes: HF Linear weights [out, in]; llama q/k rows [H * D] / [K * D] (H query heads, K kv heads,
D head dim).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from capjax.convert import Place, gguf_to_hf_name, params_from_tensors, unpermute_llama_cpp

# GGUF architectures whose llama.cpp converter permutes q/k rows into pairwise RoPE order
# (transformers' TENSOR_PROCESSORS maps only "llama" to LlamaTensorProcessor; mistral files say "llama").
_PERMUTED_QK = ("llama",)
# Those whose tensor names `capjax.convert.gguf_to_hf_name` maps. Gemma's norms (stored +1, other
# names) and Phi-3's fused qkv / gate_up are not mapped.
TENSOR_ARCHITECTURES = ("llama", "qwen2", "qwen3")


class GGUFFormatError(ValueError):
    """A GGUF file lacks what capjax needs to read it."""


def _reader(path: str | os.PathLike):
    """The parsed file, shared by the config, tokenizer and tensor reads of one load (parsing the
    metadata of every tensor takes seconds); a file rewritten since is parsed again."""
    p = Path(path).resolve()
    st = p.stat()
    return _parsed(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFFormatError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download it or pass an HF folder"
        ) from e


def _value(field) -> Any:
    """A metadata value as transformers' `_gguf_parse_value` gives it: a one-element array is its element."""
    v = field.contents()
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def _architecture(reader, path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFFormatError(f"{path} has no general.architecture in its metadata; is it a model GGUF?")
    return field.contents()


def gguf_config(path: str | os.PathLike) -> dict:
    """The transformers config dict of a GGUF file, as `load_gguf_checkpoint(path)["config"]` gives it
    (same keys, values and model_type renames), read without torch."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    reader = _reader(path)
    arch = _architecture(reader, path)
    name = reader.fields.get("general.name")
    # transformers tests `"mistral" in [general.name]`: list membership, i.e. the name is exactly "mistral".
    updated = "mistral" if "llama" in arch and name is not None and name.contents() == "mistral" else arch
    updated = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, updated)
    if updated not in GGUF_CONFIG_MAPPING:
        raise GGUFFormatError(
            f"{path}: GGUF architecture {arch!r} has no transformers config mapping; "
            "convert the model to an HF folder instead"
        )
    config: dict[str, Any] = {"tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors)}
    for key, default in GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        config.setdefault(key, default)
    for key, field in reader.fields.items():
        prefix, _, rest = key.replace(arch, updated).partition(".")
        section: Any = GGUF_CONFIG_MAPPING.get(prefix, {})
        renamed = section.get(rest)
        if renamed is None or renamed == -1:
            continue
        value: Any = _value(field)
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        config[renamed] = value
    if config.get("model_type") == "gemma3":  # the GGUF holds only the text backbone
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in reader.fields:
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return config


def gguf_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer of a GGUF file (what `AutoTokenizer.from_pretrained(folder,
    gguf_file=...)` builds: same token ids, special tokens and chat template), without torch."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = _reader(path)
    arch = _architecture(reader, path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise GGUFFormatError(
            f"{path} has no tokenizer.ggml.tokens: it carries no tokenizer; pass an HF "
            "folder with tokenizer files instead"
        )
    # As transformers.integrations.gguf.get_gguf_tokenizer, whose metadata reader needs torch.
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_dict.get("tokenizer_type") == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for special, key in {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "unk_token": "unknown_token_id",
        "pad_token": "padding_token_id",
    }.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[special] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    # name_or_path: the folder, as AutoTokenizer.from_pretrained(folder, gguf_file=...) sets it
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=str(Path(path).parent), **tokenizer_config, **extra
    )


def gguf_params(
    config, path: str | os.PathLike, dtype: np.dtype, place: Place | None = None, progress: str | None = None
) -> dict:
    """capjax params from a GGUF file: each tensor dequantized by `gguf` (numpy), llama's q/k row
    permutation undone as transformers' LlamaTensorProcessor does, stacked and placed by
    `params_from_tensors`."""
    import gguf

    reader = _reader(path)
    arch = _architecture(reader, path)
    if arch not in TENSOR_ARCHITECTURES:
        raise GGUFFormatError(
            f"{path}: capjax reads the tensors of GGUF architectures {', '.join(TENSOR_ARCHITECTURES)}, not "
            f"{arch!r}; convert it to an HF folder (transformers: AutoModelForCausalLM.from_pretrained(folder, "
            "gguf_file=...).save_pretrained(out)) and pass that folder"
        )
    permuted = arch in _PERMUTED_QK
    tensors = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is not None:
            tensors[name] = t

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if permuted and ".q_proj." in name:
            w = unpermute_llama_cpp(w, config.num_heads)
        elif permuted and ".k_proj." in name:
            w = unpermute_llama_cpp(w, config.num_kv_heads)
        return w.astype(dtype)

    return params_from_tensors(config, get, set(tensors), dtype, place, progress)
