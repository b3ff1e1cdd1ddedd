"""Activation patching (capjax.patching) against a PyTorch forward-hook loop over transformers' model
(tests/torch_sites.py): every unit type, noising and denoising, each metric; bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import capjax
from capjax.patching import answer_ce, logit_diff, normalized_logit_diff, patch
from conftest import make_hf_model
from torch_sites import hf_run

HEADS = {"attn.z": "H", "attn.q": "H", "attn.k": "K", "attn.v": "K"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patch_llama")
    hf = make_hf_model(folder, "llama", initializer_range=0.2)  # GQA: H 4, K 2; large weights: visible effects
    model, params = capjax.load_pretrained(folder)
    return hf, model, params


def prompts(B=3, T=8, seed=0):
    """clean and corrupted [B, T] differing in one token per row, answer / wrong tokens [B]."""
    rng = np.random.RandomState(seed)
    clean = rng.randint(3, 101, (B, T))
    corrupted = clean.copy()
    corrupted[:, 3] = (clean[:, 3] + 1 + rng.randint(0, 50, B)) % 101
    return clean, corrupted, rng.randint(0, 101, B), rng.randint(0, 101, B)


def hook_patch(hf, target, source, am, site, positions, metric_np, read_at):
    """The same patching, one transformers run per unit with a hook replacing the unit's value."""
    _, src = hf_run(hf, source, am, sites=[site])
    cfg = hf.config
    B, T = target.shape
    n = {"H": cfg.num_attention_heads, "K": cfg.num_key_value_heads}.get(HEADS.get(site))
    L = cfg.num_hidden_layers
    dims = ((T,) if positions else ()) + ((n,) if n else ())
    out = np.zeros((L, *dims))
    for l in range(L):
        for idx in np.ndindex(*dims):

            def edit(name, layer, v, idx=idx, l=l):
                if name != site or layer != l:
                    return None
                s = torch.tensor(src[site][l], dtype=v.dtype)
                v = v.clone()
                sel = (slice(None),) + ((idx[0],) if positions else (slice(None),)) + (idx[-1:] if n else ())
                v[sel] = s[sel]
                return v

            logits, _ = hf_run(hf, target, am, edit=edit, sites=())
            out[(l, *idx)] = metric_np(logits[np.arange(B), read_at])
    return out


def np_logit_diff(answer, wrong):
    return lambda z: float(np.mean(z[np.arange(len(z)), answer] - z[np.arange(len(z)), wrong]))


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize(
    "site,positions", [("attn.z", False), ("attn.z", True), ("mlp.out", False), ("resid.pre", True)]
)
def test_patching_equals_hook_loop(tiny, site, positions, direction):
    hf, model, params = tiny
    clean, corrupted, answer, wrong = prompts()
    read_at = np.full(3, 7)
    res = patch(
        model,
        params,
        clean,
        corrupted,
        site,
        logit_diff(answer, wrong),
        positions=positions,
        direction=direction,
        read_at=read_at,
        chunk_size=3,
    )
    target, source = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    want = hook_patch(hf, target, source, None, site, positions, np_logit_diff(answer, wrong), read_at)
    assert res.values.shape == want.shape
    np.testing.assert_allclose(res.values, want, atol=1e-4, rtol=0)
    ld = np_logit_diff(answer, wrong)
    assert abs(res.clean - ld(hf_run(hf, clean, sites=())[0][:, 7])) < 1e-4
    assert abs(res.corrupted - ld(hf_run(hf, corrupted, sites=())[0][:, 7])) < 1e-4
    # some unit moves the metric well above the tolerance
    base = res.clean if direction == "noising" else res.corrupted
    assert np.abs(want - base).max() > 1e-2


def test_kv_heads_padding_and_every_metric(tiny):
    """attn.v per kv head on a right-padded batch (read at each row's last real token); answer CE,
    normalized logit difference, and any function of the full logits."""
    hf, model, params = tiny
    clean, corrupted, answer, wrong = prompts(seed=1)
    am = np.ones_like(clean)
    am[1, 6:] = 0
    am[2, 5:] = 0
    last = am.sum(1) - 1
    ce = patch(model, params, clean, corrupted, "attn.v", answer_ce(answer), read_at=last, attention_mask=am)

    def np_ce(z):
        logp = torch.log_softmax(torch.tensor(z), -1).numpy()
        return float(-np.mean(logp[np.arange(3), answer]))

    np.testing.assert_allclose(
        ce.values, hook_patch(hf, clean, corrupted, am, "attn.v", False, np_ce, last), atol=1e-4, rtol=0
    )
    ld = patch(model, params, clean, corrupted, "attn.v", logit_diff(answer, wrong), read_at=last, attention_mask=am)
    norm = patch(
        model,
        params,
        clean,
        corrupted,
        "attn.v",
        normalized_logit_diff(answer, wrong, ld.clean, ld.corrupted),
        read_at=last,
        attention_mask=am,
    )
    np.testing.assert_allclose(norm.values, (ld.values - ld.corrupted) / (ld.clean - ld.corrupted), atol=1e-4)
    np.testing.assert_allclose(norm.values, ld.normalized(), atol=1e-4)
    assert abs(norm.clean - 1) < 1e-5 and abs(norm.corrupted) < 1e-5

    def mean_max(logits):  # [B, T, V]: the mean of the largest logit at every position
        return jnp.mean(jnp.max(logits, axis=-1))

    full = patch(model, params, clean, corrupted, "attn.out", mean_max, positions=True)
    src = [torch.tensor(a) for a in hf_run(hf, corrupted, sites=["attn.out"])[1]["attn.out"]]
    want = np.zeros((2, 8))
    for l, t in np.ndindex(2, 8):

        def edit(name, layer, v, l=l, t=t):
            if name == "attn.out" and layer == l:
                v = v.clone()
                v[:, t] = src[l][:, t].to(v.dtype)
                return v

        want[l, t] = hf_run(hf, clean, edit=edit, sites=())[0].max(-1).mean()
    np.testing.assert_allclose(full.values, want, atol=1e-4, rtol=0)


def test_bad_input_is_one_line_before_compute(tiny):
    _, model, params = tiny
    clean, corrupted, answer, wrong = prompts()
    m = logit_diff(answer, wrong)
    with pytest.raises(
        ValueError,
        match=r"^clean and corrupted tokens must both be \[B, T\] of one shape, got "
        r"\[3, 8\] and \[3, 7\]",
    ):
        patch(model, params, clean, corrupted[:, :7], "attn.z", m)
    with pytest.raises(ValueError, match=r"^layer 2 is out of range: the model has L = 2 layers \(0 .. 1\)$"):
        patch(model, params, clean, corrupted, "attn.z", m, layers=[0, 2])
    with pytest.raises(ValueError, match=r"^read_at position 8 is out of range for T = 8$"):
        patch(model, params, clean, corrupted, "attn.z", m, read_at=[7, 8, 7])
    with pytest.raises(ValueError, match=r"^unknown site 'attn.zz': use one of resid.pre"):
        patch(model, params, clean, corrupted, "attn.zz", m)
    with pytest.raises(ValueError, match=r"^site 'attn.pattern' cannot be patched here: use one of"):
        patch(model, params, clean, corrupted, "attn.pattern", m)
    with pytest.raises(ValueError, match=r"^unknown direction 'both'"):
        patch(model, params, clean, corrupted, "attn.z", m, direction="both")


@pytest.mark.parametrize("site,positions", [("attn.z", False), ("resid.pre", True)])
def test_attribution_patching_equals_finite_differences(tiny, site, positions):
    """d metric / d eps of the target run with unit value v + eps (source - v), by central differences in
    float64 on transformers' model, equals attribution patching's (source - v) . gradient per unit."""
    import copy

    from capjax.patching import attribution_patch

    hf, model, params = tiny
    hf64 = copy.deepcopy(hf).double()
    clean, corrupted, answer, wrong = prompts(seed=2)
    read_at = np.full(3, 7)
    exact = patch(
        model, params, clean, corrupted, site, logit_diff(answer, wrong), positions=positions, read_at=read_at
    )
    est = attribution_patch(
        model,
        params,
        clean,
        corrupted,
        site,
        logit_diff(answer, wrong),
        positions=positions,
        read_at=read_at,
        exact=exact,
    )
    _, src = hf_run(hf64, corrupted, sites=[site])
    ld = np_logit_diff(answer, wrong)
    n = hf.config.num_attention_heads if site in HEADS else None
    dims = ((8,) if positions else ()) + ((n,) if n else ())
    fd = np.zeros((2, *dims))
    eps = 1e-3
    for l in range(2):
        for idx in np.ndindex(*dims):
            vals = []
            for e in (eps, -eps):

                def edit(name, layer, v, idx=idx, l=l, e=e):
                    if name != site or layer != l:
                        return None
                    s = torch.tensor(src[site][l], dtype=v.dtype)
                    sel = (slice(None),) + ((idx[0],) if positions else (slice(None),)) + (idx[-1:] if n else ())
                    v = v.clone()
                    v[sel] = v[sel] + e * (s[sel] - v[sel])
                    return v

                vals.append(ld(hf_run(hf64, clean, edit=edit, sites=())[0][:, 7]))
            fd[(l, *idx)] = (vals[0] - vals[1]) / (2 * eps)
    np.testing.assert_allclose(est["values"] - est["baseline"], fd, atol=2e-4, rtol=1e-3)
    assert np.abs(fd).max() > 1e-2
    assert abs(est["baseline"] - exact.clean) < 1e-4
    # the reported correlation is Pearson's of the estimated and the exact changes over units
    want_r = np.corrcoef(fd.ravel(), (exact.values - exact.clean).ravel())[0, 1]
    assert abs(est["correlation"] - want_r) < 1e-3


def hook_path_patch(hf, clean, corrupted, pair, receiver, metric_np, read_at):
    """The hook loop: clean run with the sender head's z from the corrupted run and every other head's z
    and every MLP output frozen at their clean values, reading the receiver's input; then a clean run
    with only the receiver head's q / k / v replaced by it."""
    ls, hs, lr, hr = pair
    _, cl = hf_run(hf, clean, sites=["attn.z", "mlp.out"])
    _, co = hf_run(hf, corrupted, sites=["attn.z"])

    def freeze(name, layer, v):
        if name == "attn.z":
            new = torch.tensor(cl["attn.z"][layer], dtype=v.dtype)
            if layer == ls:
                new[:, :, hs] = torch.tensor(co["attn.z"][layer][:, :, hs], dtype=v.dtype)
            return new
        if name == "mlp.out":
            return torch.tensor(cl["mlp.out"][layer], dtype=v.dtype)
        return None

    _, got = hf_run(hf, clean, edit=freeze, sites=[receiver])
    new_in = got[receiver][lr]

    def patch_receiver(name, layer, v):
        if name == receiver and layer == lr:
            v = v.clone()
            v[:, :, hr] = torch.tensor(new_in[:, :, hr], dtype=v.dtype)
            return v
        return None

    logits, _ = hf_run(hf, clean, edit=patch_receiver, sites=())
    return metric_np(logits[np.arange(len(clean)), read_at])


@pytest.mark.parametrize("receiver", ["attn.q", "attn.k", "attn.v"])
def test_path_patching_equals_hook_loop(tmp_path, receiver):
    from capjax.patching import path_patch

    folder = tmp_path / "m"
    hf = make_hf_model(folder, "llama", initializer_range=0.2, num_hidden_layers=3)
    model, params = capjax.load_pretrained(folder)
    clean, corrupted, answer, wrong = prompts(seed=3)
    n = 4 if receiver == "attn.q" else 2
    pairs = [(0, 1, 1, 0), (0, 3, 2, n - 1), (1, 2, 2, 1), (0, 0, 1, n - 1), (1, 0, 2, 0)]
    read_at = np.full(3, 7)
    got = path_patch(
        model,
        params,
        clean,
        corrupted,
        pairs,
        logit_diff(answer, wrong),
        receiver=receiver,
        read_at=read_at,
        chunk_size=2,
    )
    want = np.array(
        [hook_path_patch(hf, clean, corrupted, p, receiver, np_logit_diff(answer, wrong), read_at) for p in pairs]
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    plain = np_logit_diff(answer, wrong)(hf_run(hf, clean, sites=())[0][:, 7])
    assert np.abs(want - plain).max() > 1e-2  # the paths matter
    with pytest.raises(
        ValueError,
        match=r"^pair 1 \(1, 0, 1, 0\) is out of range: layers 0 .. 2 with the receiver "
        r"above the sender",
    ):
        path_patch(model, params, clean, corrupted, [(0, 0, 1, 0), (1, 0, 1, 0)], logit_diff(answer, wrong))
