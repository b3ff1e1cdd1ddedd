"""Named sites and run_with_cache against transformers' PyTorch model with forward hooks (tests/torch_sites.py):
every site's cached value per family (GQA), edits through the one Interventions value, and bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import capjax
from capjax.cache import cache_bytes, run_with_cache
from capjax.memory import InsufficientMemoryError
from capjax.sites import SITES, Edit, Interventions
from conftest import make_hf_model, padded_tokens
from test_families import CASES
from torch_sites import hf_run

FAMILIES = {"llama_gqa": ("llama", {}), **{k: CASES[k] for k in ("qwen3_gqa", "gemma2_gqa", "gemma3_gqa", "phi3_gqa")}}


def _load(folder, case):
    model_type, overrides = FAMILIES[case]
    hf = make_hf_model(folder, model_type, randomize_norms=True, **overrides)
    hf.config._attn_implementation = "eager"  # the pattern is read from eager attention's weights
    model, params = capjax.load_pretrained(folder)
    return hf, model, params


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_every_site_equals_torch_hooks(tmp_path, case):
    hf, model, params = _load(tmp_path, case)
    tokens, am = padded_tokens()
    valid = am.astype(bool)
    logits, cache = run_with_cache(model, params, tokens, sites=list(SITES), attention_mask=am)
    want_logits, want = hf_run(hf, tokens, am)
    assert set(cache) == set(SITES) == set(want)
    np.testing.assert_allclose(np.asarray(logits)[valid], want_logits[valid], atol=1e-4, rtol=0)
    L = model.config.num_layers
    for site in SITES:
        ours = np.asarray(cache[site])
        ref = np.stack(want[site])
        assert ours.shape == ref.shape == (L, *ref.shape[1:]), site
        if site == "attn.pattern":  # [L, B, H, T, S]: valid query rows
            ours, ref = ours.transpose(0, 1, 3, 2, 4)[:, valid], ref.transpose(0, 1, 3, 2, 4)[:, valid]
        else:
            ours, ref = ours[:, valid], ref[:, valid]
        scale = max(1.0, np.abs(ref).max())
        np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0, err_msg=site)


def test_edits_equal_torch_hooks(tmp_path):
    """keep / replace / add at several sites at once, per layer, through the one Interventions value."""
    hf, model, params = _load(tmp_path, "llama_gqa")
    c = model.config
    L, H, K, D, E, F = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    tokens, am = padded_tokens()
    B, T = tokens.shape
    rng = np.random.RandomState(0)
    keep_z = rng.rand(L, H).astype(np.float32)
    rep_z = rng.randn(L, H, D).astype(np.float32)
    add_mid = rng.randn(L, B, T, F).astype(np.float32) * 0.1
    keep_v = rng.rand(L, K).astype(np.float32)
    rep_pre = rng.randn(L, B, T, E).astype(np.float32)
    keep_pre = (rng.rand(L, B, T) > 0.7).astype(np.float32)
    iv = Interventions(
        {
            "attn.z": Edit(keep_z, rep_z),
            "mlp.hidden": Edit(add=add_mid),
            "attn.v": Edit(keep_v),
            "resid.pre": Edit(keep_pre, rep_pre),
        }
    )

    def edit(name, l, v):
        import torch

        t = lambda a: torch.tensor(a, dtype=v.dtype)  # noqa: E731
        if name == "attn.z":
            k = t(keep_z[l])[:, None]
            return k * v + (1 - k) * t(rep_z[l])
        if name == "mlp.hidden":
            return v + t(add_mid[l])
        if name == "attn.v":
            return t(keep_v[l])[:, None] * v
        if name == "resid.pre":
            k = t(keep_pre[l])[..., None]
            return k * v + (1 - k) * t(rep_pre[l])
        return None

    want, _ = hf_run(hf, tokens, am, edit=edit, sites=())
    plain, _ = hf_run(hf, tokens, am, sites=())
    ours = np.asarray(
        model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am), interventions=iv)
    )
    valid = am.astype(bool)
    assert np.abs(want - plain)[valid].max() > 0.1  # the edits matter
    np.testing.assert_allclose(ours[valid], want[valid], atol=1e-4, rtol=0)
    # head_mask is an edit of attn.z: the same as keep_z with no replacement
    a = model.apply({"params": params}, jnp.asarray(tokens), head_mask=jnp.asarray(keep_z))
    b = model.apply({"params": params}, jnp.asarray(tokens), interventions=Interventions({"attn.z": Edit(keep_z)}))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pattern_edits_equal_torch_eager_attention(tmp_path, monkeypatch):
    """attn.pattern keep / replace (per head and per batch x head) against transformers' eager attention
    with the same edit applied to its post-softmax weights before they multiply the values."""
    import torch
    from transformers.models.llama import modeling_llama

    hf, model, params = _load(tmp_path, "llama_gqa")
    c = model.config
    L, H = c.num_layers, c.num_heads
    tokens, am = padded_tokens()
    B, T = tokens.shape
    rng = np.random.RandomState(1)
    allowed = np.tril(np.ones((T, T), bool))[None] & (am[:, None, :] > 0)  # [B, T, S]: keys a query may see
    rep = rng.rand(L, B, H, T, T).astype(np.float32) * allowed[None, :, None]
    rep /= np.maximum(rep.sum(-1, keepdims=True), 1e-9)  # another attention pattern on the same keys
    cases = {
        "keep [H] + replace": (rng.rand(L, H).astype(np.float32), rep),
        "keep [B, H]": ((rng.rand(L, B, H) > 0.5).astype(np.float32), None),
    }
    edit = {}
    eager = modeling_llama.eager_attention_forward

    def edited_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        G = module.num_key_value_groups
        k, v = (modeling_llama.repeat_kv(a, G) for a in (key, value))
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, H, T, S]
        keep, replace = edit["keep"], edit["replace"]
        kp = torch.tensor(keep[module.layer_idx])
        kp = kp[None, :, None, None] if kp.ndim == 1 else kp[:, :, None, None]
        w = kp * w + (0 if replace is None else (1 - kp) * torch.tensor(replace[module.layer_idx]))
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", edited_eager)
    valid = am.astype(bool)
    for name, (keep, replace) in cases.items():
        edit.update(keep=keep, replace=replace)
        want, _ = hf_run(hf, tokens, am, sites=())
        iv = Interventions({"attn.pattern": Edit(keep, replace)})
        ours = np.asarray(
            model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am), interventions=iv)
        )
        np.testing.assert_allclose(ours[valid], want[valid], atol=1e-4, rtol=0, err_msg=name)
        monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager)
        plain, _ = hf_run(hf, tokens, am, sites=())
        monkeypatch.setattr(modeling_llama, "eager_attention_forward", edited_eager)
        assert np.abs(want - plain)[valid].max() > 100 * 1e-4, name  # the edit matters (100 x the tolerance)


def test_cache_of_packed_rows_equals_each_example_alone(tmp_path):
    """run_with_cache on packed rows (capjax.packing, several examples per row): every site's values at an
    example's positions equal the cache of that example run alone (itself checked against torch hooks);
    the pattern's keys outside the example's segment are zero."""
    from capjax.packing import pack_examples

    _, model, params = _load(tmp_path, "llama_gqa")
    rng = np.random.RandomState(2)
    lengths = [7, 3, 4, 2]
    T = max(lengths)
    tokens = rng.randint(1, model.config.vocab_size, (len(lengths), T)).astype(np.int32)
    am = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    packed = pack_examples(tokens, am, am, share_prefix=False)
    assert packed.tokens.shape[0] < len(lengths)  # really packed: fewer rows than examples
    sites = sorted(SITES)
    hm = np.random.RandomState(3).rand(model.config.num_layers, model.config.num_heads).astype(np.float32)
    logits, cache = run_with_cache(
        model, params, packed.tokens, sites, head_mask=hm, segment_ids=packed.segment_ids, positions=packed.positions
    )
    for b, n in enumerate(lengths):
        r, cols = np.nonzero(packed.segment_ids == b + 1)
        assert len(cols) == n and len(set(r)) == 1
        r = r[0]
        alone_logits, alone = run_with_cache(model, params, tokens[b : b + 1, :n], sites, head_mask=hm)
        np.testing.assert_allclose(np.asarray(logits)[r, cols], np.asarray(alone_logits)[0], atol=1e-5, rtol=0)
        for s in sites:
            got = np.asarray(cache[s])[:, r]
            if s == "attn.pattern":  # [L, H, T, S]
                block = got[:, :, cols][..., cols]
                np.testing.assert_allclose(block, np.asarray(alone[s])[:, 0], atol=1e-6, rtol=0, err_msg=s)
                assert np.abs(got[:, :, cols].sum(-1) - 1).max() < 1e-5, s  # no weight outside the segment
            else:
                np.testing.assert_allclose(got[:, cols], np.asarray(alone[s])[:, 0], atol=1e-5, rtol=0, err_msg=s)
    with pytest.raises(ValueError, match=r"^run_with_cache: packed rows take segment_ids and positions"):
        run_with_cache(model, params, packed.tokens, ["attn.z"], segment_ids=packed.segment_ids)


def test_cache_keeps_only_requested_sites_and_bad_input_is_one_line(tmp_path):
    _, model, params = _load(tmp_path, "llama_gqa")
    tokens, am = padded_tokens()
    logits, cache = run_with_cache(model, params, tokens, sites=["attn.z"], attention_mask=am)
    assert set(cache) == {"attn.z"}
    np.testing.assert_allclose(
        np.asarray(logits),
        np.asarray(model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(am))),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match=r"unknown site 'attn.zz': use one of resid.pre, attn.in, attn.q.*resid.post$"):
        run_with_cache(model, params, tokens, sites=["attn.zz"])
    need = cache_bytes(model.config, ["attn.z"], *tokens.shape)
    assert need == model.config.num_layers * np.prod(tokens.shape) * model.config.num_heads * model.config.head_dim * 4
    with pytest.raises(InsufficientMemoryError, match=r"^run_with_cache: caching attn.z on \[3, 12\] tokens needs"):
        run_with_cache(model, params, tokens, sites=["attn.z"], budget_bytes=need)
    with pytest.raises(ValueError, match="unknown site 'mlp'"):
        Interventions({"mlp": Edit(1.0)})


def _shared_prefix_rows(model):
    """Three examples that start with the same Pf = 6 tokens, packed with the prefix stored once
    (capjax.packing): (tokens [3, T], attention mask [3, T], lengths of their own tokens, Pf, packed)."""
    from capjax.packing import pack_examples

    rng = np.random.RandomState(4)
    Pf, lengths = 6, [3, 2, 4]
    prefix = rng.randint(1, model.config.vocab_size, Pf)
    T = Pf + max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    am = np.zeros_like(tokens)
    for b, n in enumerate(lengths):
        tokens[b, : Pf + n] = np.concatenate([prefix, rng.randint(1, model.config.vocab_size, n)])
        am[b, : Pf + n] = 1
    loss = np.zeros(tokens.shape, np.float32)
    loss[np.arange(len(lengths)), Pf + np.asarray(lengths) - 1] = 1  # the last token: every token kept
    packed = pack_examples(tokens, loss, am, share_prefix=True)
    assert packed.prefix_len == Pf  # shared
    assert any(len(set(row[row > 0])) > 1 for row in packed.segment_ids)  # and packed: two examples in a row
    return tokens, am, lengths, Pf, packed


def _assert_sites_of_whole_sequences(got, want, packed, lengths, Pf, sites):
    """got {site: [L, P, ...]} of shared-prefix packed rows equal want {site: [per layer [B, ...]]}
    (hooks on each example's whole sequence) at the example's columns; the pattern's prefix keys and
    own keys land in the example's columns, and the prefix's own values at row 0's first Pf."""
    for b, n in enumerate(lengths):
        r, cols = np.nonzero(packed.segment_ids == b + 1)
        assert len(cols) == n and len(set(r)) == 1
        r = r[0]
        for s in sites:
            ref = np.stack(want[s])[:, b]  # [L, ...] of example b's whole sequence
            ours = np.asarray(got[s])[:, r]
            if s == "attn.pattern":  # ours [L, H, S, Pf + S], ref [L, H, T, T]: keys prefix, then own
                ours = np.concatenate([ours[..., :Pf], ours[..., Pf + cols]], axis=-1)[:, :, cols]
                ref = ref[:, :, Pf : Pf + n, : Pf + n]
                assert np.abs(np.asarray(got[s])[:, r][:, :, cols].sum(-1) - 1).max() < 1e-5  # no other keys
            else:
                ours, ref = ours[:, cols], ref[:, Pf : Pf + n]
            scale = max(1.0, np.abs(ref).max())
            np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0, err_msg=f"example {b} {s}")
    for s in sites:  # the prefix itself: row 0's first Pf tokens
        if s != "attn.pattern":
            ref = np.stack(want[s])[:, 0, :Pf]
            scale = max(1.0, np.abs(ref).max())
            np.testing.assert_allclose(np.asarray(got[s])[:, 0, :Pf], ref, atol=1e-4 * scale, rtol=0, err_msg=s)


@pytest.mark.slow  # ~10-20 s on the loaded 2-core machine (every site, one more compile)
def test_sites_of_shared_prefix_rows_equal_torch_hooks(tmp_path):
    """Shared-prefix packed rows (capjax.packing, prefix_len > 0: the prefix stored once in row 0,
    every example's keys are that prefix then its own tokens), every site captured by the one layer
    scan, equal transformers' model with hooks on each example's whole sequence (prefix + own
    tokens); the pattern's prefix keys and own keys land in the example's columns."""
    from capjax.model import layer_context
    from capjax.scan import scan_layers

    hf, model, params = _load(tmp_path, "llama_gqa")
    tokens, am, lengths, Pf, packed = _shared_prefix_rows(model)
    x, ctx = layer_context(
        model, params, jnp.asarray(packed.tokens), None, packed.positions, packed.segment_ids, packed.prefix_len
    )
    sites = sorted(SITES)
    _, got = scan_layers(model, params, x, ctx, iv=Interventions(capture=frozenset(sites)), collect="sites")
    _, want = hf_run(hf, tokens, am)
    _assert_sites_of_whole_sequences(got, want, packed, lengths, Pf, sites)


def test_cache_of_shared_prefix_rows_equals_torch_hooks(tmp_path):
    """run_with_cache(prefix_len=Pf) on shared-prefix packed rows: the logits and the cached sites at
    each example's columns equal transformers' hooks on that example's whole sequence (prefix + own
    tokens); the pattern's key axis is Pf + T. Bad prefix_len: one line each, before compute."""
    hf, model, params = _load(tmp_path, "llama_gqa")
    tokens, am, lengths, Pf, packed = _shared_prefix_rows(model)
    sites = ["attn.pattern", "attn.z", "mlp.hidden", "resid.post"]
    logits, got = run_with_cache(
        model, params, packed.tokens, sites, segment_ids=packed.segment_ids, positions=packed.positions, prefix_len=Pf
    )
    want_logits, want = hf_run(hf, tokens, am, sites=sites)
    c, (P, S) = model.config, packed.tokens.shape
    assert got["attn.pattern"].shape == (c.num_layers, P, c.num_heads, S, Pf + S)
    _assert_sites_of_whole_sequences(got, want, packed, lengths, Pf, sites)
    for b, n in enumerate(lengths):
        r, cols = np.nonzero(packed.segment_ids == b + 1)
        np.testing.assert_allclose(np.asarray(logits)[r[0], cols], want_logits[b, Pf : Pf + n], atol=1e-4, rtol=0)
    seg, pos = packed.segment_ids, packed.positions
    for kwargs, message in (
        (dict(prefix_len=Pf), r"^run_with_cache: prefix_len \(a shared prefix\) needs segment_ids and positions"),
        (dict(prefix_len=-1, segment_ids=seg, positions=pos), r"^run_with_cache: prefix_len must be an int >= 0"),
        (dict(prefix_len=S + 1, segment_ids=seg, positions=pos), rf"^run_with_cache: prefix_len {S + 1} is longer"),
    ):
        with pytest.raises(ValueError, match=message):
            run_with_cache(model, params, packed.tokens, sites, **kwargs)
