"""capjax.patching against transformer-lens 4.3 (`transformer_lens.patching`, its own sweeps) on the same
tiny random transformers models and prompts, noising and denoising, within 1e-4 in float32.

transformer-lens 4 loads a model as a `TransformerBridge` over the transformers module itself
(`boot_transformers(folder, hf_model=...)`, offline): its default keeps the raw weights (no fold_ln,
no centering; `enable_compatibility_mode()` would fold them), so its activations are transformers'.
Its sweeps run the `corrupted_tokens` with one unit at a time taken from `clean_cache`: capjax's
denoising; noising is the same call with the two inputs swapped.

Where a transformer-lens hook means another value than capjax's site it is not compared (the
transformers hook loop of tests/test_patching.py is the reference there): Qwen3's and Gemma 3's
hook_q / hook_k are before q_norm / k_norm (capjax: after), Gemma 2 / 3's hook_attn_out /
hook_mlp_out are after the sandwich norms (capjax: before).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tlp
from transformer_lens.model_bridge import TransformerBridge

import capjax
from capjax.patching import logit_diff, patch
from conftest import char_tokenizer, make_hf_model

READ = 5  # the position whose logits both metrics read (T = 6)


def prompts(B=3, T=6, seed=0):
    """clean and corrupted [B, T] differing in one token per row, answer / wrong tokens [B]."""
    rng = np.random.RandomState(seed)
    clean = rng.randint(3, 101, (B, T))
    corrupted = clean.copy()
    corrupted[:, 3] = (clean[:, 3] + 1 + rng.randint(0, 50, B)) % 101
    return clean, corrupted, rng.randint(0, 101, B), rng.randint(0, 101, B)


CLEAN, CORRUPTED, ANSWER, WRONG = prompts()
METRIC = logit_diff(ANSWER, WRONG)  # one object: capjax's compiled sweeps are reused across directions


def tl_metric(logits):  # [B, T, V] -> scalar, transformer-lens's metric convention
    rows = torch.arange(len(ANSWER))
    return (logits[rows, READ, ANSWER] - logits[rows, READ, WRONG]).mean()


def _whole(corrupted_activation, index, clean_activation):
    """transformer-lens patch setter for index = [layer]: the whole [B, T, E] activation."""
    corrupted_activation[...] = clean_activation
    return corrupted_activation


def _per_layer(name):
    """transformer-lens's generic sweep over layers only (it ships E-wide sweeps by position only)."""
    return lambda model, tokens, cache, metric: tlp.generic_activation_patch(
        model, tokens, cache, metric, patch_setter=_whole, activation_name=name, index_axis_names=("layer",)
    )


# capjax site -> transformer-lens sweep, all positions / by position
TL_SWEEPS = {
    "attn.z": (tlp.get_act_patch_attn_head_out_all_pos, tlp.get_act_patch_attn_head_out_by_pos),
    "attn.q": (tlp.get_act_patch_attn_head_q_all_pos, tlp.get_act_patch_attn_head_q_by_pos),
    "attn.k": (tlp.get_act_patch_attn_head_k_all_pos, tlp.get_act_patch_attn_head_k_by_pos),
    "attn.v": (tlp.get_act_patch_attn_head_v_all_pos, tlp.get_act_patch_attn_head_v_by_pos),
    "resid.pre": (_per_layer("resid_pre"), tlp.get_act_patch_resid_pre),
    "resid.mid": (_per_layer("resid_mid"), tlp.get_act_patch_resid_mid),
    "attn.out": (_per_layer("attn_out"), tlp.get_act_patch_attn_out),
    "mlp.out": (_per_layer("mlp_out"), tlp.get_act_patch_mlp_out),
}

FAMILY_KW = {
    "llama": {},
    "llama_mha": {"num_key_value_heads": 4},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {"head_dim": 8},
    "gemma3_text": {"head_dim": 8},
    "phi3": {"pad_token_id": 0},
}  # Phi-3's default pad id is >= V


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family -> (transformer-lens bridge, capjax model, params) of one tiny random model (H 4, K 2;
    llama_mha: K 4)."""
    out = {}

    def get(family):
        if family not in out:
            folder = tmp_path_factory.mktemp(family)
            hf = make_hf_model(folder, family.removesuffix("_mha"), initializer_range=0.2, **FAMILY_KW[family])
            # a fresh tokenizer per bridge: a second boot with one tokenizer object fails in 4.3 (KeyError)
            bridge = TransformerBridge.boot_transformers(
                str(folder), hf_model=hf, tokenizer=char_tokenizer(), device="cpu", dtype=torch.float32
            )
            out[family] = (bridge, *capjax.load_pretrained(folder))
        return out[family]

    return get


def tl_patch(bridge, site, positions, direction):
    """transformer-lens's sweep of `site`'s units: the target run with each unit from the source's cache."""
    target, source = (CLEAN, CORRUPTED) if direction == "noising" else (CORRUPTED, CLEAN)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.tensor(source))
        return TL_SWEEPS[site][positions](bridge, torch.tensor(target), cache, tl_metric).numpy()


SLOW = pytest.mark.slow  # kept out of the default run for time: each case compiles capjax's kernels (a new
# family all of them, ~7 s of CPU) and transformer-lens runs one hooked forward per unit (~0.1 s of CPU each)
CASES = [  # (family, site, positions): every unit type on Llama (GQA: H 4, K 2), a head site on each other family
    ("llama", "attn.z", False),
    ("llama", "attn.z", True),
    ("llama", "attn.v", False),
    ("llama", "resid.pre", True),
    ("llama", "attn.out", True),
    ("llama", "mlp.out", False),
    pytest.param("llama", "attn.q", False, marks=SLOW),
    pytest.param("llama", "attn.k", False, marks=SLOW),
    pytest.param("llama", "resid.mid", False, marks=SLOW),
    pytest.param("llama", "mlp.out", True, marks=SLOW),
    pytest.param("qwen2", "attn.k", False, marks=SLOW),  # q / k / v biases
    pytest.param("qwen3", "attn.z", False, marks=SLOW),
    pytest.param("gemma2", "attn.z", False, marks=SLOW),
    pytest.param("gemma3_text", "attn.v", False, marks=SLOW),
    pytest.param("phi3", "attn.q", False, marks=SLOW),  # fused qkv
]


@pytest.mark.parametrize("family,site,positions", CASES)
def test_patch_equals_transformer_lens(loaded, family, site, positions):
    bridge, model, params = loaded(family)
    for direction in ("noising", "denoising"):
        want = tl_patch(bridge, site, positions, direction)
        got = patch(
            model,
            params,
            CLEAN,
            CORRUPTED,
            site,
            METRIC,
            positions=positions,
            direction=direction,
            read_at=np.full(3, READ),
            chunk_size=8,
        )
        assert got.values.shape == want.shape, (direction, got.values.shape, want.shape)
        np.testing.assert_allclose(got.values, want, atol=1e-4, rtol=0, err_msg=direction)
        with torch.no_grad():
            base = float(tl_metric(bridge(torch.tensor(CLEAN if direction == "noising" else CORRUPTED))))
        assert abs((got.clean if direction == "noising" else got.corrupted) - base) < 1e-4
        assert np.abs(want - base).max() > 1e-2, "no unit moves the metric: the comparison would be vacuous"


@pytest.mark.parametrize(
    "family,receiver",
    [
        ("llama", "attn.q"),
        # transformer-lens refuses k / v paths on GQA ("per-query-head K/V semantics are undefined")
        pytest.param("llama_mha", "attn.k", marks=SLOW),
        pytest.param("llama_mha", "attn.v", marks=SLOW),
    ],
)
def test_path_patch_equals_transformer_lens_direct_path(loaded, family, receiver):
    """capjax.patching.path_patch against transformer-lens's get_act_patch_direct_path (the IOI paper's
    construction: the sender head's write z @ W_O changed only in the receiver head's own copy of the
    residual stream), every head of layer 0 into every head of layer 1, both directions."""
    from capjax.patching import path_patch

    bridge, model, params = loaded(family)
    H = model.config.num_heads
    for direction in ("noising", "denoising"):
        target, source = (CLEAN, CORRUPTED) if direction == "noising" else (CORRUPTED, CLEAN)
        with torch.no_grad():
            _, src_cache = bridge.run_with_cache(torch.tensor(source))
            _, tgt_cache = bridge.run_with_cache(torch.tensor(target))
            want = np.stack(
                [
                    tlp.get_act_patch_direct_path(
                        bridge,
                        torch.tensor(target),
                        src_cache,
                        tgt_cache,
                        tl_metric,
                        0,
                        h,
                        component=receiver[-1],
                        verbose=False,
                    )[1].numpy()
                    for h in range(H)
                ]
            )
        pairs = [(0, hs, 1, hr) for hs in range(H) for hr in range(H)]
        got = path_patch(
            model,
            params,
            CLEAN,
            CORRUPTED,
            pairs,
            METRIC,
            receiver=receiver,
            direction=direction,
            read_at=np.full(3, READ),
            chunk_size=8,
        ).reshape(H, H)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=direction)
        with torch.no_grad():
            base = float(tl_metric(bridge(torch.tensor(target))))
        assert np.abs(want - base).max() > 1e-2, "no path moves the metric: the comparison would be vacuous"
