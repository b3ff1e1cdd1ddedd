"""Each model family beyond Llama/Mistral/Qwen2 against transformers' PyTorch model (the oracle):
logits, head masks (o_proj pre-hook), KV-cache generation, save/reload, pruning + export, `capjax run`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml

import capjax
from capjax.cli import main
from capjax.evaluate import generate
from capjax.families import SUPPORTED_MODEL_TYPES, family_for
from capjax.model import init_cache
from capjax.pruning import heads_to_remove, prune, sparsity_report
from conftest import char_tokenizer, check_save_reload, hooked_logits, make_hf_model, padded_tokens

# Tiny random configs: MHA and GQA for every family (head_dim set where the family's default is large).
CASES = {
    "qwen3_mha": ("qwen3", dict(num_key_value_heads=4, head_dim=8)),
    "qwen3_gqa": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
    # Soft-caps small enough to bind on tiny logits; sliding window 4 < T; query scalar != D.
    "gemma2_gqa": (
        "gemma2",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=16,
            sliding_window=4,
            attn_logit_softcapping=0.1,
            final_logit_softcapping=0.1,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "gemma2_mha": (
        "gemma2",
        dict(
            num_key_value_heads=4,
            head_dim=8,
            sliding_window=4,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            layer_types=["full_attention", "sliding_attention"],
        ),
    ),
    "gemma3_gqa": (
        "gemma3_text",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
            },
        ),
    ),
    "gemma3_mha": (
        "gemma3_text",
        dict(num_key_value_heads=4, head_dim=16, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
    ),
    "phi3_gqa": ("phi3", dict(num_key_value_heads=2, sliding_window=4, pad_token_id=0, eos_token_id=1)),
    "phi3_mha": ("phi3", dict(num_key_value_heads=4, pad_token_id=0, eos_token_id=1)),
}
# Generation needs margins between logits: no soft-cap that saturates them.
GENERATE_OVERRIDES = {"gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)}


def _load(tmp_path, case, **extra):
    model_type, overrides = CASES[case]
    hf = make_hf_model(tmp_path, model_type, randomize_norms=True, **{**overrides, **extra})
    model, params = capjax.load_pretrained(tmp_path)
    return hf, model, params


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_head_mask_match_transformers(tmp_path, case):
    hf, model, params = _load(tmp_path, case)
    tokens, am = padded_tokens()
    valid = am.astype(bool)
    L, H = model.config.num_layers, model.config.num_heads
    rng = np.random.RandomState(1)
    masks = [np.ones((L, H), np.float32), (rng.rand(L, H) > 0.5).astype(np.float32), rng.rand(L, H).astype(np.float32)]
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
        np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=0)


# One case per family runs by default (MHA or GQA alternately); the rest are slow.
DEFAULT_CASES = {"qwen3_gqa", "gemma2_gqa", "gemma3_gqa", "phi3_gqa"}
SLOW = pytest.mark.slow  # each ~10-60 s on 2 loaded CPU cores


def _split(cases):
    return [c if c in DEFAULT_CASES else pytest.param(c, marks=SLOW) for c in sorted(cases)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decoding_equals_full_forward(tmp_path, case):
    _, model, params = _load(tmp_path, case)
    tokens = np.random.RandomState(2).randint(0, 101, (2, 10))
    full = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    cache = init_cache(model.config, 2, 16)
    logits, cache = model.apply({"params": params}, jnp.asarray(tokens[:, :6]), cache=cache)
    steps = [np.asarray(logits)]
    for t in range(6, 10):
        logits, cache = model.apply({"params": params}, jnp.asarray(tokens[:, t : t + 1]), cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


@SLOW
@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_matches_transformers(tmp_path, case):
    hf, model, params = _load(tmp_path, case, initializer_range=0.2, **GENERATE_OVERRIDES.get(CASES[case][0], {}))
    prompts = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7], [42]]
    ours = generate(model, params, prompts, max_new_tokens=6, batch_size=4, eos_ids=[])
    for p, row in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(
                input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert row == ref[0, len(p) :].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_reload_roundtrip(tmp_path, case):
    hf, model, params = _load(tmp_path / "src", case)
    check_save_reload(hf, model, params, tmp_path / "out")


@pytest.mark.parametrize("case", _split(CASES))
@pytest.mark.parametrize(
    "method,nm", [("cap", None), pytest.param("wanda", None, marks=SLOW), pytest.param("cap", "2:4", marks=SLOW)]
)
def test_prune_and_export(tmp_path, case, method, nm):
    _, model, params = _load(tmp_path / "src", case)
    L, H = model.config.num_layers, model.config.num_heads
    delta = np.random.default_rng(0).normal(size=(L, H))
    calib = {
        "tokens": np.random.default_rng(2).integers(0, 101, (4, 16)).astype(np.int32),
        "attention_mask": np.ones((4, 16), np.int32),
    }
    pruned, _ = prune(model, params, method, 0.5, head_scores=delta, calib=calib, nm=nm)
    assert sparsity_report(pruned).total == pytest.approx(0.5, abs=0.02)
    capjax.save_pretrained(model, pruned, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, 101, (2, 12))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(model.apply({"params": pruned}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    if nm:  # every group of 4 consecutive inputs of every output row keeps at most 2
        mlp = hf.model.layers[0].mlp
        w = (mlp.up_proj if hasattr(mlp, "up_proj") else mlp.gate_up_proj).weight.detach().numpy()
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("case", sorted(DEFAULT_CASES))
def test_cap_heads_equals_o_proj_prehook(tmp_path, case):
    """cap_heads (a removed head loses its q columns and o rows; a kv head goes when its whole group
    does) gives the logits of transformers' dense model whose removed heads' o_proj input is zeroed
    by a pre-hook."""
    hf, model, params = _load(tmp_path, case)
    L, H, K = model.config.num_layers, model.config.num_heads, model.config.num_kv_heads
    G = H // K
    delta = np.random.default_rng(3).normal(size=(L, H))
    delta[0, :G] = -10.0 - np.arange(G)  # layer 0's first kv group scores lowest: its k / v go too
    pruned, masks = prune(model, params, "cap_heads", 0.5, head_scores=delta)
    removed = heads_to_remove(delta, 0.5)
    assert removed[0, :G].all() and removed.sum() == L * H // 2
    kv_kept = np.asarray(masks["layers"]["self_attn"]["k_proj"]["kernel"]).any(axis=(1, 3))  # [L, E, K, D] -> [L, K]
    np.testing.assert_array_equal(kv_kept, ~removed.reshape(L, K, G).all(-1))
    tokens, am = padded_tokens()
    ref = hooked_logits(hf, (~removed).astype(np.float32), tokens, am)
    out = np.asarray(model.apply({"params": pruned}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)))
    valid = am.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=0)


@SLOW
@pytest.mark.parametrize("model_type", sorted({t for t, _ in CASES.values()}))
def test_capjax_run(tmp_path, model_type):
    case = next(k for k, (t, _) in CASES.items() if t == model_type)
    make_hf_model(
        tmp_path / "model",
        model_type,
        **{
            **CASES[case][1],
            "max_position_embeddings": 512,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "bos_token_id": None,
        },
    )
    char_tokenizer().save_pretrained(tmp_path / "model")
    cfg = {
        "model": str(tmp_path / "model"),
        "out": str(tmp_path / "out"),
        "seed": 0,
        "calibration": {"tasks": ["synthetic"], "n": 4, "seq_len": 256, "subsets": 2},
        "pruning": {"methods": ["cap", "wanda"], "sparsities": [0.5]},
        "evaluation": {"tasks": ["synthetic"], "limit": 2, "max_new_tokens": 4, "batch_size": 2},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "exp.yaml")]) == 0
    import json

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["dense", "cap_synthetic_s0.50", "wanda_synthetic_s0.50"]


@pytest.mark.parametrize(
    "model_type,field,value",
    [
        ("qwen3", "attention_bias", True),
        ("qwen3", "use_sliding_window", True),
        ("qwen3", "hidden_act", "gelu"),
        ("gemma2", "hidden_activation", "relu"),
        ("gemma2", "attention_bias", True),
        ("gemma3_text", "use_bidirectional_attention", True),
        ("gemma3_text", "layer_types", ["chunked_attention"]),
        ("phi3", "hidden_act", "gelu_new"),
    ],
)
def test_unhandled_family_field_is_refused_by_name(model_type, field, value):
    with pytest.raises(capjax.UnsupportedConfigError, match=f"config field {field}="):
        capjax.ModelConfig.from_hf(
            {
                "model_type": model_type,
                field: value,
                "hidden_size": 32,
                "num_attention_heads": 4,
                "vocab_size": 11,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
            }
        )


def test_unknown_family_is_refused_with_the_list():
    with pytest.raises(capjax.UnsupportedConfigError, match="unsupported model_type 'gpt2'.*qwen3.*gemma2"):
        capjax.ModelConfig.from_hf({"model_type": "gpt2"})
    assert family_for("qwen3").name == "qwen3" and "qwen3" in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("case", ["gemma2_gqa", "gemma3_gqa", "qwen3_gqa"])
def test_layer_by_layer_path_equals_decoder(tmp_path, case):
    """Scoring and pruning's path (layer_context, apply_layer per layer, unembed / token_nll)
    against the Decoder's scan: same logits, and token_nll (soft-capped, chunked vocab) equal to
    -log_softmax of them."""
    from capjax.model import apply_layer, layer_context, layer_params, token_nll, unembed

    _, model, params = _load(tmp_path, case)
    tokens, am = padded_tokens()
    full = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)))
    x, ctx = layer_context(model, params, jnp.asarray(tokens), jnp.asarray(am))
    for l in range(model.config.num_layers):
        x = apply_layer(model, layer_params(params, l), x, ctx, layer=l)
    np.testing.assert_allclose(np.asarray(unembed(model, params, x)), full, atol=1e-5, rtol=0)
    target = jnp.asarray(tokens[:, 1:].reshape(-1))
    nll = token_nll(model, params, x[:, :-1].reshape(-1, x.shape[-1]), target, vocab_chunk=32)
    ref = -np.take_along_axis(
        jax.nn.log_softmax(full[:, :-1].reshape(-1, full.shape[-1])), np.asarray(target)[:, None], axis=-1
    )[:, 0]
    np.testing.assert_allclose(np.asarray(nll), ref, atol=1e-5, rtol=0)
    if model.config.mixed_layers:
        with pytest.raises(ValueError, match="pass the layer index"):
            apply_layer(model, layer_params(params, 0), x, ctx)
