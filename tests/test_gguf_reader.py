"""capjax.gguf_reader reads GGUF files without torch and equals transformers' (torch) GGUF path:
the same config dict, the same token ids, params bit for bit. Oracles: transformers'
load_gguf_checkpoint / AutoTokenizer(gguf_file=) / AutoModelForCausalLM(gguf_file=), and tiny
GGUFs written with gguf.GGUFWriter from a transformers model, permuted as llama.cpp's converter does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

import capjax
import capjax.io
from capjax.convert import params_from_tensors
from capjax.gguf_reader import gguf_config, gguf_tokenizer
from conftest import make_hf_model, needs_smollm2

ROOT = Path(__file__).resolve().parents[1]

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: half-split RoPE rows -> pairwise."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path: Path, arch: str) -> Path:
    """A float32 GGUF of a transformers model, written as llama.cpp's converter writes `arch`."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for name, t in hf.state_dict().items():
        a = t.numpy()
        if name in _GLOBAL:
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            gname = _GLOBAL[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_LAYER[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj."):
                a = _llama_cpp_permute(a, c.num_attention_heads)
            elif arch == "llama" and rest.startswith("self_attn.k_proj."):
                a = _llama_cpp_permute(a, c.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "model_type,arch,overrides",
    [
        ("llama", "llama", {}),
        ("qwen2", "qwen2", {"tie_word_embeddings": True}),  # biases, and no q/k permutation
        ("qwen3", "qwen3", {"head_dim": 128}),  # q/k norms; transformers' GGUF config leaves head_dim at 128
    ],
)
def test_tiny_gguf_equals_source_and_transformers(tmp_path, model_type, arch, overrides):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = make_hf_model(tmp_path / "src", model_type, randomize_norms=True, **overrides)
    path = write_gguf(hf, tmp_path / "tiny.gguf", arch)
    assert gguf_config(path) == load_gguf_checkpoint(str(path))["config"]
    model, params = capjax.load_pretrained(path)
    _, ref = capjax.load_pretrained(tmp_path / "src")
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    tokens = np.random.RandomState(0).randint(0, 101, (2, 7))
    with torch.no_grad():
        expected = hf_gguf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)), expected, atol=1e-4)


def test_one_parse_per_load_and_a_rewritten_file_is_read_again(tmp_path, monkeypatch):
    """Config and tensors share one parse of the file; a file rewritten at the same path gives its
    new weights, not the cached ones."""
    parses = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or real(*a, **k))
    path = tmp_path / "tiny.gguf"
    for seed in (0, 1):
        hf = make_hf_model(tmp_path / f"src{seed}", "llama", seed=seed)
        write_gguf(hf, path, "llama")
        _, params = capjax.load_pretrained(path)
        _, ref = capjax.load_pretrained(tmp_path / f"src{seed}")
        jax.tree.map(np.testing.assert_array_equal, params, ref)
        assert len(parses) == seed + 1


def test_unmapped_architecture_refused_before_reading_tensors(tmp_path):
    from capjax.gguf_reader import gguf_params

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ValueError,
        match=r"g.gguf: capjax reads the tensors of GGUF architectures llama, qwen2, "
        r"qwen3, not 'gemma2'; convert it to an HF folder",
    ):
        gguf_params(None, tmp_path / "g.gguf", np.float32)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf is not a readable GGUF file"):
        capjax.load_pretrained(bad)


@needs_smollm2
def test_smollm2_config_equals_transformers():
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from capjax.io import smollm2_gguf_path

    path = smollm2_gguf_path()
    assert gguf_config(path) == load_gguf_checkpoint(str(path))["config"]


@needs_smollm2
def test_smollm2_params_bit_identical_to_transformers(smollm2):
    model, params, _, hf = smollm2
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    ref = params_from_tensors(model.config, state.__getitem__, set(state), np.float32)
    jax.tree.map(np.testing.assert_array_equal, params, ref)


@needs_smollm2
def test_smollm2_tokenizer_equals_transformers():
    from capjax.io import smollm2_gguf_path

    path = smollm2_gguf_path()
    ours = gguf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in [
        "Hello world!",
        "  two spaces\n\nand 12345 digits",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>",
        "Ünïcödé ☃ 日本語",
    ]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token, len(ours), ours.name_or_path) == (
        ref.bos_token,
        ref.eos_token,
        ref.pad_token,
        ref.unk_token,
        len(ref),
        ref.name_or_path,
    )


# Hides torch from the import system (find_spec too, which transformers' is_torch_available asks).
_NO_TORCH = """
import importlib.machinery, sys
class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


@needs_smollm2
def test_gguf_loading_works_without_torch(tmp_path):
    """With torch hidden, a GGUF's config, params and tokenizer still load (the `make demo` venv has no torch)."""
    hf = make_hf_model(tmp_path / "src", "llama")
    path = write_gguf(hf, tmp_path / "tiny.gguf", "llama")
    code = (
        _NO_TORCH
        + """
import numpy as np, capjax
from transformers.utils import is_torch_available
assert not is_torch_available()
model, params = capjax.load_pretrained(sys.argv[1])
tok = capjax.load_tokenizer("smollm2-135m-instruct")
np.save(sys.argv[2], np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"]))
print(tok("Hello world!")["input_ids"])
assert "torch" not in sys.modules
"""
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "q.npy")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    _, ref = capjax.load_pretrained(tmp_path / "src")
    np.testing.assert_array_equal(np.load(tmp_path / "q.npy"), ref["layers"]["self_attn"]["q_proj"]["kernel"])
    gguf_file = capjax.io.smollm2_gguf_path()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert r.stdout.splitlines()[-1] == str(ref_tok("Hello world!")["input_ids"])
