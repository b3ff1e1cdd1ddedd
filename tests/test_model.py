"""The Flax decoder against transformers' PyTorch models (the oracle): logits, head masks, dtypes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import capjax
from conftest import hooked_logits, make_hf_model, needs_smollm2, padded_tokens

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}

CASES = {
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_mqa": ("llama", dict(num_key_value_heads=1)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama_head_dim": ("llama", dict(head_dim=16)),
    "mistral_window": ("mistral", dict(sliding_window=4)),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False)),
}


def _valid(x, attention_mask):
    return x[attention_mask.astype(bool)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = make_hf_model(tmp_path, model_type, **overrides)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, am = padded_tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits.numpy()
    out = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)))
    chex.assert_trees_all_close(_valid(out, am), _valid(ref, am), atol=1e-4, rtol=0)
    if case == "qwen2_bias":
        assert "bias" in params["layers"]["self_attn"]["q_proj"]


def test_sliding_window_changes_result(tmp_path):
    """Guards the Mistral case above against a window that never binds."""
    make_hf_model(tmp_path / "w", "mistral", sliding_window=4)
    make_hf_model(tmp_path / "f", "mistral", sliding_window=None)
    tokens, _ = padded_tokens()
    outs = [
        np.asarray(m.apply({"params": p}, jnp.asarray(tokens)))
        for m, p in (capjax.load_pretrained(tmp_path / k) for k in "wf")
    ]
    assert np.abs(outs[0][:, 4:] - outs[1][:, 4:]).max() > 1e-3
    np.testing.assert_allclose(outs[0][:, :4], outs[1][:, :4], atol=1e-6)


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2_bias"])
def test_head_mask_matches_o_proj_hook(tmp_path, case):
    model_type, overrides = CASES[case]
    hf = make_hf_model(tmp_path, model_type, **overrides)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, am = padded_tokens()
    L, H = model.config.num_layers, model.config.num_heads
    rng = np.random.RandomState(1)
    masks = [
        np.eye(L * H)[3].reshape(L, H) * -1 + 1,  # one head of layer 0 zeroed
        np.eye(L * H)[L * H - 1].reshape(L, H) * -1 + 1,  # last head of the last layer
        (rng.rand(L, H) > 0.5).astype(np.float32),  # several zeros
        rng.rand(L, H).astype(np.float32),
    ]  # fractional
    apply = jax.jit(model.apply)
    for head_mask in masks:
        ref = hooked_logits(hf, head_mask, tokens, am)
        out = np.asarray(
            apply(
                {"params": params},
                jnp.asarray(tokens),
                head_mask=jnp.asarray(head_mask),
                attention_mask=jnp.asarray(am),
            )
        )
        chex.assert_trees_all_close(_valid(out, am), _valid(ref, am), atol=1e-4, rtol=0)


def test_all_ones_mask_is_exactly_unmasked(tmp_path):
    make_hf_model(tmp_path)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, am = padded_tokens()
    ones = jnp.ones((model.config.num_layers, model.config.num_heads))
    a = model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am))
    b = model.apply({"params": params}, jnp.asarray(tokens), head_mask=ones, attention_mask=jnp.asarray(am))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    zero_one = ones.at[0, 1].set(0.0)
    c = model.apply({"params": params}, jnp.asarray(tokens), head_mask=zero_one, attention_mask=jnp.asarray(am))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


def test_bfloat16_close_to_float32_reference(tmp_path):
    """bf16 params and compute, float32 softmax/logits. bf16 keeps 8 mantissa bits (relative rounding
    2^-9 ~ 0.2%) per op; through two layers the logits (scale ~1) move by a few 1e-2, so we require
    max abs diff < 0.1 and the same argmax almost everywhere, against the float32 PyTorch model."""
    hf = make_hf_model(tmp_path)
    model, params = capjax.load_pretrained(tmp_path, dtype="bfloat16")
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
    tokens, am = padded_tokens()
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits.numpy()
    out = model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am))
    assert out.dtype == jnp.float32
    out = np.asarray(out)
    assert np.abs(_valid(out, am) - _valid(ref, am)).max() < 0.1
    assert (_valid(out, am).argmax(-1) == _valid(ref, am).argmax(-1)).mean() > 0.9


def test_kv_cache_prefill_and_steps_match_full_forward(tmp_path):
    make_hf_model(tmp_path)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, _ = padded_tokens(B=2, T=10)
    full = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    cache = capjax.init_cache(model.config, 2, 16)
    valid = jnp.zeros((2, 16), jnp.int32).at[:, :10].set(1)
    logits, cache = model.apply({"params": params}, jnp.asarray(tokens[:, :6]), attention_mask=valid, cache=cache)
    steps = [np.asarray(logits)]
    for t in range(6, 10):
        logits, cache = model.apply(
            {"params": params}, jnp.asarray(tokens[:, t : t + 1]), attention_mask=valid, cache=cache
        )
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache["index"]) == 10


def test_sites_captured_with_the_kv_cache_equal_the_full_forward(tmp_path):
    """Captures and edits on cached calls (prefill, then one token per step: the layer scan carries
    the cache and stacks the sites at once) equal the uncached forward's at the same positions."""
    from capjax.sites import Edit, Interventions, collect_sites

    make_hf_model(tmp_path)
    model, params = capjax.load_pretrained(tmp_path)
    c = model.config
    tokens = jnp.asarray(padded_tokens(B=2, T=8)[0])
    keep = jnp.asarray(np.random.RandomState(0).rand(c.num_layers, c.num_heads), jnp.float32)
    iv = Interventions({"attn.z": Edit(keep=keep)}, {"attn.z", "resid.post"})

    @jax.jit
    def run(tokens, cache=None):
        valid = None if cache is None else jnp.ones((2, 8), jnp.int32)
        out, state = model.apply(
            {"params": params}, tokens, attention_mask=valid, cache=cache, interventions=iv, mutable=["sites"]
        )
        return out, collect_sites(state["sites"])

    full, want = run(tokens)
    (logits, cache), sites = run(tokens[:, :5], capjax.init_cache(c, 2, 8))
    got = [(logits, sites)]
    for t in range(5, 8):
        (logits, cache), sites = run(tokens[:, t : t + 1], cache)
        got.append((logits, sites))
    np.testing.assert_allclose(np.concatenate([g[0] for g in got], axis=1), full, atol=1e-5, rtol=0)
    for site in ("attn.z", "resid.post"):
        ours = np.concatenate([g[1][site] for g in got], axis=2)  # [L, B, T, ...]
        np.testing.assert_allclose(ours, want[site], atol=1e-5, rtol=0, err_msg=site)


def test_head_mask_wrong_shape_is_refused(tmp_path):
    make_hf_model(tmp_path)
    model, params = capjax.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"head_mask has shape \(4, 2\), expected \[L, H\] = \[2, 4\]"):
        model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32), head_mask=jnp.ones((4, 2)))


@needs_smollm2
def test_real_smollm2_matches_transformers(smollm2):
    model, params, tokenizer, hf = smollm2
    text = (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 12 plus 30?"}], tokenize=False, add_generation_prompt=True
        )
        + "12 plus 30 is"
    )
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    chex.assert_trees_all_close(out, ref, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
    # Greedy next token agrees at the end of the prompt too.
    greedy = tokenizer.decode(out[0, -1].argmax())
    assert greedy == tokenizer.decode(ref[0, -1].argmax())


@pytest.mark.parametrize("case", ["llama_gqa", "llama_tied"])
@pytest.mark.parametrize("vocab_chunk", [16, 101, 4096])
def test_token_nll_equals_transformers_cross_entropy(tmp_path, case, vocab_chunk):
    # 16 does not divide V = 101 (padded last chunk); 4096 > V (one chunk).
    model_type, overrides = CASES[case]
    hf = make_hf_model(tmp_path, model_type, **overrides)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, am = padded_tokens()
    with torch.no_grad():
        logits = hf(torch.tensor(tokens), attention_mask=torch.tensor(am)).logits
        ref = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), torch.tensor(tokens[:, 1:]).reshape(-1), reduction="none"
        )
    hidden, _ = model.apply(
        {"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am), method=capjax.Decoder.hidden_states
    )
    E = hidden.shape[-1]
    out = capjax.model.token_nll(
        model, params, hidden[:, :-1].reshape(-1, E), jnp.asarray(tokens[:, 1:]).reshape(-1), vocab_chunk=vocab_chunk
    )
    valid = am[:, 1:].reshape(-1).astype(bool)
    chex.assert_trees_all_close(np.asarray(out)[valid], ref.numpy()[valid], atol=1e-4, rtol=0)


def test_layer_rows_equal_full_layer_gathered(tmp_path):
    make_hf_model(tmp_path, "llama", num_key_value_heads=2)
    model, params = capjax.load_pretrained(tmp_path)
    tokens, am = padded_tokens()
    x, ctx = capjax.model.layer_context(model, params, jnp.asarray(tokens), jnp.asarray(am))
    lp = capjax.model.layer_params(params, 1)
    head_mask = jnp.asarray([1.0, 0.0, 0.5, 1.0])
    rows = jnp.asarray([0, 5, 13, 14, 30], jnp.int32)  # flat indices into B * T, across examples
    iv = capjax.sites.with_head_mask(None, head_mask)
    full = capjax.model.apply_layer(model, lp, x, ctx, iv)
    part = capjax.model.apply_layer(model, lp, x, ctx, iv, rows=rows)
    with pytest.raises(TypeError, match=r"^apply_layer's iv must be capjax.sites.Interventions, got ArrayImpl"):
        capjax.model.apply_layer(model, lp, x, ctx, head_mask)  # the old positional head mask
    chex.assert_trees_all_close(part, full.reshape(-1, full.shape[-1])[rows], atol=1e-6, rtol=0)
