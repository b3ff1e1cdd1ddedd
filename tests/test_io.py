"""Loading and saving: round trips through transformers, key sets, shards, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import capjax
from capjax.config import ModelConfig, UnsupportedConfigError
from conftest import check_save_reload, make_hf_model, needs_smollm2
from worker_common import FakeAccelerator


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {"tie_word_embeddings": False}),
        ("mistral", {"sliding_window": 4}),
    ],
)
def test_save_reload_roundtrip(tmp_path, model_type, overrides):
    hf = make_hf_model(tmp_path / "src", model_type, **overrides)
    model, params = capjax.load_pretrained(tmp_path / "src")
    check_save_reload(hf, model, params, tmp_path / "out")


def test_sharded_checkpoint_with_index(tmp_path):
    make_hf_model(tmp_path / "src")
    model, params = capjax.load_pretrained(tmp_path / "src")
    capjax.save_pretrained(model, params, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _, params2 = capjax.load_pretrained(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    tokens = np.random.RandomState(0).randint(0, 101, (1, 5))
    with torch.no_grad():
        ref = reloaded(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params2}, jnp.asarray(tokens))), ref, atol=1e-4)


def test_bfloat16_save_keeps_dtype(tmp_path):
    make_hf_model(tmp_path / "src")
    model, params = capjax.load_pretrained(tmp_path / "src", dtype="bfloat16")
    capjax.save_pretrained(model, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        capjax.load_pretrained(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        capjax.load_pretrained(tmp_path)


def test_folder_without_weights(tmp_path):
    transformers.LlamaConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights"):
        capjax.load_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedConfigError, match="unsupported model_type 'gpt2'"):
        capjax.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("mlp_bias", True, "mlp_bias=True"),
        ("attention_bias", True, "attention_bias=True"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type='yarn'"),
    ],
)
def test_unhandled_config_field(field, value, match):
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, **{field: value})
    with pytest.raises(UnsupportedConfigError, match=match):
        ModelConfig.from_hf(cfg)


def test_qwen2_sliding_window_refused():
    cfg = transformers.Qwen2Config(hidden_size=32, num_attention_heads=4, use_sliding_window=True)
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        ModelConfig.from_hf(cfg)


def test_unknown_dtype(tmp_path):
    make_hf_model(tmp_path)
    with pytest.raises(ValueError, match="dtype 'float16' not supported"):
        capjax.load_pretrained(tmp_path, dtype="float16")


@needs_smollm2
def test_smollm2_config_and_tokenizer(smollm2):
    model, params, tokenizer, _ = smollm2
    c = model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (30, 9, 3, 64, 576)
    assert c.tie_word_embeddings and "lm_head" not in params
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 3, 64)
    assert tokenizer.chat_template


# ---------------------------------------------------------------------------- too little memory
@pytest.mark.parametrize(
    "model_type,overrides",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {"tie_word_embeddings": False})],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_params_bytes_match_the_loaded_tree(tmp_path, model_type, overrides, dtype):
    """The pre-flight estimate, from shapes alone, equals what loading really allocates."""
    from capjax.memory import params_bytes

    make_hf_model(tmp_path, model_type, **overrides)
    model, params = capjax.load_pretrained(tmp_path, dtype=dtype)
    sizes = [leaf.nbytes for leaf in jax.tree.leaves(params)]
    assert params_bytes(model.config, model.dtype) == (sum(sizes), max(sizes))


def test_too_little_host_memory_is_refused_before_loading(tmp_path, monkeypatch):
    from capjax import memory

    make_hf_model(tmp_path)
    config = capjax.load_config(tmp_path)
    f32, f32_leaf = memory.params_bytes(config, jnp.float32)
    bf16, bf16_leaf = memory.params_bytes(config, jnp.bfloat16)
    read = []
    monkeypatch.setattr(capjax.io, "params_from_tensors", lambda *a: read.append(a) or {})
    monkeypatch.setattr(memory, "host_available_bytes", lambda: bf16 + bf16_leaf)  # enough for bf16 only
    with pytest.raises(memory.InsufficientMemoryError) as err:
        capjax.load_pretrained(tmp_path)
    assert read == []  # refused before reading any tensor
    message = str(err.value)
    assert f"need {(f32 + f32_leaf) / 2**30:.2f} GiB in float32" in message
    assert "host RAM has" in message and "bfloat16" in message and "CAPJAX_SKIP_MEMORY_CHECK=1" in message
    capjax.load_pretrained(tmp_path, dtype="bfloat16")  # the suggested fix works
    assert len(read) == 1
    monkeypatch.setattr(memory, "host_available_bytes", lambda: bf16 + bf16_leaf - 1)
    with pytest.raises(memory.InsufficientMemoryError, match="bfloat16 .*but host RAM has"):
        capjax.load_pretrained(tmp_path, dtype="bfloat16")
    monkeypatch.setenv("CAPJAX_SKIP_MEMORY_CHECK", "1")
    capjax.load_pretrained(tmp_path, dtype="bfloat16")
    assert len(read) == 2


def test_hub_model_too_big_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    from capjax import memory

    repo = tmp_path / "repo"  # what the hub would serve
    make_hf_model(repo)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None):  # copies the matching files, like the hub cache
        calls.append(list(allow_patterns))
        snap = tmp_path / "cache" / repo_id.replace("/", "--")
        snap.mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():
            if any(Path(f.name).match(pat) for pat in allow_patterns):
                shutil.copy(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    config = capjax.load_config(repo)
    total, largest = memory.params_bytes(config, jnp.float32)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: total + largest - 1)
    with pytest.raises(memory.InsufficientMemoryError):
        capjax.load_pretrained("some-org/some-model")
    assert calls == [["config.json"]]  # the weights were never requested
    monkeypatch.setattr(memory, "host_available_bytes", lambda: total + largest)
    model, params = capjax.load_pretrained("some-org/some-model")
    assert calls[1:] == [["config.json"], ["*.json", "*.safetensors", "tokenizer*"]]
    assert model.config == config and params["embed_tokens"]["embedding"].shape == (101, 32)


def test_too_little_accelerator_memory():
    from capjax.config import ModelConfig
    from capjax.memory import InsufficientMemoryError, check_params_fit, params_bytes

    c = ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128)  # Llama-3-8B shapes
    total, largest = params_bytes(c, jnp.bfloat16)
    assert total == 2 * c.num_params()
    check_params_fit(c, jnp.bfloat16, FakeAccelerator(total + 1000, 1000), host_bytes=largest)
    with pytest.raises(InsufficientMemoryError, match=r"its params need 14\.96 GiB in bfloat16 .*gpu device 0"):
        check_params_fit(c, jnp.bfloat16, FakeAccelerator(total + 1000, 1001), host_bytes=largest)
    with pytest.raises(InsufficientMemoryError, match="largest stacked tensor .*host RAM"):
        check_params_fit(c, jnp.bfloat16, FakeAccelerator(80 << 30, 0), host_bytes=largest - 1)
