"""Structured compression (capjax.structured): the shrunken model equals the dense model with the
same heads / channels / layers masked, for every family; its export loads in transformers with the
same logits and back in capjax; impossible targets are refused in one line."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import capjax
from capjax.structured import Plan, PlanError, budget_shape, choose, masked_logits, shrink, target_shape
from capjax.structured.plan import layer_params
from conftest import make_hf_model, padded_tokens

L3 = dict(num_hidden_layers=3)
GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
# Tiny random configs (conftest.TINY: H=4, E=32, F=48) with 3 layers, per family.
CASES = {
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2_bias": ("qwen2", dict(num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": (
        "gemma2",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=16,
            sliding_window=4,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=10.0,
            layer_types=GEMMA_TYPES,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            layer_types=GEMMA_TYPES,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    "phi3": ("phi3", dict(num_key_value_heads=2, sliding_window=4, pad_token_id=0, eos_token_id=1)),
}


def _load(folder, case):
    model_type, overrides = CASES[case]
    hf = make_hf_model(folder, model_type, randomize_norms=True, **{**L3, **overrides})
    model, params = capjax.load_pretrained(folder)
    return hf, model, params


def _random_plan(config, seed, **target):
    rng = np.random.default_rng(seed)
    shape = target_shape(config, **target)
    return choose(
        config,
        shape,
        rng.normal(size=(config.num_layers, config.num_heads)),
        rng.normal(size=(config.num_layers, config.intermediate_size)),
        rng.normal(size=config.num_layers),
    )


def _targets(config):
    heads_kv = dict(heads=0.5, head_groups="kv")
    out = [dict(heads=0.5), dict(mlp=0.25), dict(layers=1), dict(heads=0.5, mlp=0.5, layers=1)]
    return out + ([heads_kv, dict(heads_kv, mlp=0.25, layers=1)] if config.group_size > 1 else [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_shrink_equals_mask_and_exports(tmp_path, case):
    """For heads (per kv group and whole kv groups), channels, layers and all together: the shrunken
    model's logits equal the masked dense model's (float32 noise); the combined one, saved, loads in
    transformers with the same logits and back in capjax with the same config and params."""
    hf, model, params = _load(tmp_path / "src", case)
    c = model.config
    tokens, am = padded_tokens()
    valid = am.astype(bool)
    for i, target in enumerate(_targets(c)):
        plan = _random_plan(c, i, **target)
        small, small_params = shrink(model, params, plan)
        assert small.config.num_heads == plan.shape.num_heads and small.config.head_dim == c.head_dim
        ref = np.asarray(masked_logits(model, params, plan, tokens, am))
        got = np.asarray(small.apply({"params": small_params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am)))
        np.testing.assert_allclose(got[valid], ref[valid], atol=2e-5, rtol=0, err_msg=str(target))
    # the last target removes heads, channels and a layer: export it
    capjax.save_pretrained(small, small_params, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded) is type(hf)
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers, cfg.intermediate_size) == (
        small.config.num_heads,
        small.config.num_kv_heads,
        small.config.num_layers,
        small.config.intermediate_size,
    )
    assert cfg.head_dim == c.head_dim
    if c.layer_types is not None:
        assert tuple(cfg.layer_types) == tuple(c.layer_types[l] for l in plan.layers)
    with torch.no_grad():
        hf_logits = loaded(torch.as_tensor(tokens), attention_mask=torch.as_tensor(am)).logits.numpy()
    np.testing.assert_allclose(got[valid], hf_logits[valid], atol=1e-4, rtol=0)
    again, again_params = capjax.load_pretrained(tmp_path / "out")
    assert again.config == small.config
    for a, b in zip(jax_leaves(again_params), jax_leaves(small_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_choose_keeps_highest_scores_per_kv_group():
    """Hand-computed: per layer, kv groups by total score, then the best heads inside each group."""
    c = capjax.ModelConfig("llama", 11, 12, 6, 2, 6, 2, 4)  # E=12, H=6, K=2, G=3, F=6
    hs = np.array([[0, 5, 1, 9, 9, 9], [3, 2, 1, 0, -1, 7]], float)
    plan = choose(c, target_shape(c, heads=1 / 3, mlp=1 / 3), hs, np.arange(12.0).reshape(2, 6) % 5)
    np.testing.assert_array_equal(plan.heads, [[1, 2, 3, 4], [0, 1, 3, 5]])  # ties: lower index first
    np.testing.assert_array_equal(plan.channels, [[1, 2, 3, 4], [0, 1, 2, 3]])
    kv = choose(c, target_shape(c, heads=0.5, head_groups="kv"), hs)
    np.testing.assert_array_equal(kv.kv_heads, [[1], [0]])
    np.testing.assert_array_equal(kv.heads, [[3, 4, 5], [0, 1, 2]])
    layers = choose(c, target_shape(c, layers=1), layer_scores=[0.1, 0.0])
    np.testing.assert_array_equal(layers.layers, [0])
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


SMOL = capjax.ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, tie_word_embeddings=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=7), "num_heads=7 does not keep GQA groups equal"),
        (dict(heads=0.9), "heads=0.9 leaves a layer with no heads"),
        (dict(heads=0.1), "heads=0.1 removes no head"),
        (dict(heads=1.0), r"heads=1: the fraction removed must be in \[0, 1\)"),
        (dict(mlp=-0.1), "mlp=-0.1"),
        (dict(mlp=0.9999), "mlp=0.9999 leaves no MLP channel"),
        (dict(layers=30), "layers=30 removes all 30 layers"),
        (dict(layers=2.5), "must be an integer"),
        (dict(heads=0.5, head_groups="query", num_heads=None), None),
    ],
)
def test_impossible_targets_are_refused_in_one_line(kwargs, match):
    if match is None:
        assert target_shape(SMOL, **kwargs).num_heads == 3  # 9 heads, G=3: 1.5 of 3 per group rounds to 2 removed
        return
    with pytest.raises(PlanError, match=match) as e:
        target_shape(SMOL, **kwargs)
    assert "\n" not in str(e.value)


def test_counts_and_budget():
    s = target_shape(SMOL, heads=0.25, mlp=0.25, layers=2)
    assert (s.num_layers, s.num_kv_heads, s.group_size, s.intermediate_size) == (28, 3, 2, 1152)
    assert target_shape(SMOL, num_heads=3).group_size == 1  # one per group
    assert target_shape(SMOL, num_heads=6, head_groups="kv").num_kv_heads == 2
    b = budget_shape(SMOL, 0.8)
    budget = 0.8 * layer_params(SMOL)
    assert layer_params(b.config(SMOL)) <= budget
    # plain loop: no common fraction on a 0.001 grid gives a larger model within the budget
    fits = []
    for f in np.arange(0, 1, 0.001):
        try:
            s = target_shape(SMOL, heads=f, mlp=f, check=False)
        except PlanError:
            continue
        if layer_params(s.config(SMOL)) <= budget:
            fits.append(layer_params(s.config(SMOL)))
    assert max(fits) <= layer_params(b.config(SMOL))
    # layers: 30 * (E * H * D * 2 + E * K * D * 2 + 3 * E * F + 2 * E), by hand
    assert layer_params(SMOL) == 30 * (576 * 9 * 64 * 2 + 576 * 3 * 64 * 2 + 3 * 576 * 1536 + 2 * 576)


def test_head_count_the_family_config_cannot_express_is_refused():
    """transformers' LlamaConfig requires hidden_size % num_attention_heads == 0 even with head_dim given."""
    mha = capjax.ModelConfig("llama", 11, 32, 8, 2, 4, 4, 8)  # E=32, H=K=4
    with pytest.raises(PlanError, match=r"llama's config cannot express 3 heads.*hidden size \(32\) is not a multiple"):
        target_shape(mha, heads=0.25)
    assert target_shape(mha, heads=0.5).num_heads == 2
