"""Sharded checks on 8 fake CPU devices, run by tests/test_sharding.py in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT.json

The flag must be set before JAX initialises, hence a separate process. Each check is a function
`check_*` that raises on failure; OUT.json maps check name -> "ok" or the traceback.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # worker_common, whatever the cwd

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from capjax import sharding
from capjax.attribution import head_ablation_losses, score_heads
from capjax.config import ModelConfig
from capjax.model import Decoder, init_params
from capjax.packing import pack_examples
from capjax.pruning import global_threshold, prune, weight_scores
from capjax.pruning.importance import importance_from_scores
from capjax.pruning.threshold import count_at_or_below
from worker_common import FakeAccelerator, make_batch, run_checks

L, E, F, H, K, D, V = 3, 32, 48, 4, 2, 8, 101  # V = 101 is divisible by nothing: its dims stay whole
CONFIG = ModelConfig("qwen2", V, E, F, L, H, K, D, qkv_bias=True, max_position_embeddings=64)
MODEL = Decoder(CONFIG)
MESHES = {"data4_model2": {"data": 4, "model": 2}, "data8": {"data": -1}}
B, T = 6, 12


def _params():
    params = init_params(CONFIG, seed=0)
    rng = np.random.default_rng(0)
    # Non-trivial biases and norms, so that a wrongly sharded leaf would change the numbers.
    return jax.tree_util.tree_map_with_path(
        lambda p, a: (
            a + jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype)
            if sharding._path_name(p).endswith(("bias", "scale"))
            else a
        ),
        params,
    )


PARAMS = _params()
TOKENS, AM, LOSS, MASKS = make_batch(V, L, H, n_masks=10, batch=B, time=T)  # N = 10: padded on 4, 8 devices


def mesh(name):
    return sharding.make_mesh(MESHES[name])


def leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def check_devices():
    assert jax.device_count() == 8, jax.devices()


def check_make_mesh():
    m = sharding.make_mesh({"data": -1, "model": 2})
    assert dict(m.shape) == {"data": 4, "model": 2}, m.shape
    assert dict(sharding.make_mesh().shape) == {"data": 8}
    assert dict(sharding.make_mesh({"data": 2, "model": 2}).shape) == {"data": 2, "model": 2}
    for bad, msg in [
        ({"data": 3}, "does not divide"),
        ({"data": -1, "model": 3}, "does not divide"),
        ({"data": -1, "model": -1}, "only one axis"),
        ({"data": 0}, "positive"),
    ]:
        try:
            sharding.make_mesh(bad)
        except ValueError as e:
            assert msg in str(e), (bad, e)
        else:
            raise AssertionError(f"no ValueError for {bad}")


def check_param_specs_and_shard_shapes():
    expect = {  # path: (spec on data=4 x model=2, shard shape there, spec on data=8, shard shape there)
        "layers/self_attn/q_proj/kernel": (P(None, "data", "model"), (L, 8, 2, D), P(None, "data"), (L, 4, H, D)),
        "layers/self_attn/k_proj/kernel": (P(None, "data", "model"), (L, 8, 1, D), P(None, "data"), (L, 4, K, D)),
        "layers/self_attn/q_proj/bias": (P(None, "model"), (L, 2, D), P(), (L, H, D)),
        "layers/self_attn/o_proj/kernel": (
            P(None, "model", None, "data"),
            (L, 2, D, 8),
            P(None, None, None, "data"),
            (L, H, D, 4),
        ),
        "layers/mlp/gate_proj/kernel": (P(None, "data", "model"), (L, 8, 24), P(None, "data"), (L, 4, F)),
        "layers/mlp/down_proj/kernel": (P(None, "model", "data"), (L, 24, 8), P(None, None, "data"), (L, F, 4)),
        "embed_tokens/embedding": (P(None, "data"), (V, 8), P(None, "data"), (V, 4)),  # V = 101: not split
        "lm_head/kernel": (P("data"), (8, V), P("data"), (4, V)),
        "layers/input_layernorm/scale": (P(), (L, E), P(), (L, E)),
        "norm/scale": (P(), (E,), P(), (E,)),
    }
    for i, name in enumerate(MESHES):
        sharded = sharding.shard_params(PARAMS, mesh(name))
        for path, e in expect.items():
            a = leaf(sharded, path)
            spec, shape = e[2 * i], e[2 * i + 1]
            assert a.sharding.spec == spec, (name, path, a.sharding.spec, spec)
            shapes = {s.data.shape for s in a.addressable_shards}
            assert shapes == {shape}, (name, path, shapes, shape)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(leaf(PARAMS, path)))


def check_fit_spec_fallback():
    m = mesh("data4_model2")
    assert sharding.fit_spec(P("data", "model"), (6, 4), m) == P(None, "model")  # 6 % 4 != 0
    assert sharding.fit_spec(P("data", "absent"), (8, 4), m) == P("data")
    # a stacked rule also serves one layer's slice (Wanda / SparseGPT layer params)
    assert sharding.spec_for("self_attn/q_proj/kernel", (E, H, D), m) == P("data", "model")


def _reference():
    return head_ablation_losses(MODEL, PARAMS, TOKENS, LOSS, MASKS, AM, chunk_size=3)


REF = {}


def check_head_ablation_losses_sharded():
    ref = REF.setdefault("losses", _reference())
    for name, chunk in (("data4_model2", 3), ("data8", 1)):
        got = head_ablation_losses(MODEL, PARAMS, TOKENS, LOSS, MASKS, AM, chunk_size=chunk, mesh=mesh(name))
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{name} chunk={chunk}")


def check_score_heads_sharded():
    ref = score_heads(MODEL, PARAMS, TOKENS, LOSS, subsets=3, attention_mask=AM, progress=False)
    REF["scores"] = ref
    for name, chunk in (("data4_model2", None), ("data8", 1)):
        got = score_heads(
            MODEL, PARAMS, TOKENS, LOSS, subsets=3, attention_mask=AM, chunk_size=chunk, progress=False, mesh=mesh(name)
        )
        for f in ("delta", "masked", "baseline"):
            np.testing.assert_allclose(getattr(got, f), getattr(ref, f), atol=1e-5, err_msg=f"{name} {f}")


def check_shared_prefix_sharded():
    tokens = TOKENS.copy()
    tokens[:, :3] = tokens[0, :3]  # a 3-token prefix shared by every example, computed once
    assert pack_examples(tokens, LOSS, AM).prefix_len == 3
    ref = score_heads(MODEL, PARAMS, tokens, LOSS, subsets=3, attention_mask=AM, progress=False, share_prefix=False)
    got = score_heads(
        MODEL,
        PARAMS,
        tokens,
        LOSS,
        subsets=3,
        attention_mask=AM,
        chunk_size=1,
        progress=False,
        mesh=mesh("data4_model2"),
    )
    for f in ("delta", "masked", "baseline"):
        np.testing.assert_allclose(getattr(got, f), getattr(ref, f), atol=1e-5, err_msg=f)


def check_gradient_scores_sharded():
    ref = score_heads(MODEL, PARAMS, TOKENS, LOSS, subsets=2, method="gradient", attention_mask=AM, progress=False)
    got = score_heads(
        MODEL,
        PARAMS,
        TOKENS,
        LOSS,
        subsets=2,
        method="gradient",
        attention_mask=AM,
        progress=False,
        mesh=mesh("data4_model2"),
    )
    np.testing.assert_allclose(got.masked, ref.masked, atol=1e-5)


def check_ablations_are_split_over_data():
    """The per-device program of the sharded primitive does ~1/8 of the single-device FLOPs."""
    from capjax.ablation import prepare_batch
    from capjax.attribution import masked_nll

    masks = jnp.ones((16, L, H), jnp.float32)
    prep = prepare_batch(MODEL, TOKENS, LOSS, AM)

    def flops(m, chunk):  # one step (a while loop's body is counted once): 16 masks at once
        p = PARAMS if m is None else sharding.shard_params(PARAMS, m)
        x = masks if m is None else jax.device_put(masks, sharding.batch_sharding(m, masks.shape))
        compiled = masked_nll.lower(
            MODEL, p, prep.rows, prep.packed_ans, prep.packed.num_examples, x, chunk, mesh=m
        ).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    single, split = flops(None, 16), flops(mesh("data8"), 2)
    assert split < single / 4, (single, split)
    print(f"  flops per device: single {single:.3g}, data=8 {split:.3g}")


def _scores_and_delta():
    return REF.get("scores") or score_heads(MODEL, PARAMS, TOKENS, LOSS, attention_mask=AM, progress=False)


def check_prune_sharded_masks_identical():
    scores = _scores_and_delta()
    calib = {"tokens": TOKENS, "attention_mask": AM}
    both = tuple(MESHES)
    cases = [
        ("cap", dict(head_scores=scores), both),
        ("cap", dict(head_scores=scores, nm="2:4"), ("data8",)),
        ("wanda", dict(calib=calib, batch_size=4), both),
        ("wanda", dict(calib=calib, nm="2:4", batch_size=4), ("data4_model2",)),
    ]
    for method, kw, names in cases:
        sparsity = 0.5
        ref_p, ref_m = prune(MODEL, PARAMS, method, sparsity, **kw)
        for name in names:
            m = mesh(name)
            got_p, got_m = prune(MODEL, PARAMS, method, sparsity, mesh=m, **kw)
            assert jax.tree.structure(got_m, is_leaf=lambda x: x is None) == jax.tree.structure(
                ref_m, is_leaf=lambda x: x is None
            )
            for path in (
                "layers/self_attn/q_proj/kernel",
                "layers/self_attn/o_proj/kernel",
                "layers/mlp/down_proj/kernel",
            ):
                gm, rm = leaf(got_m, path), leaf(ref_m, path)
                want = sharding.spec_for(path, gm.shape, m)
                assert gm.sharding.spec == want and leaf(got_p, path).sharding.spec == want, (method, name, path)
            for gm, rm in zip(jax.tree.leaves(got_m), jax.tree.leaves(ref_m)):
                np.testing.assert_array_equal(np.asarray(gm), np.asarray(rm), err_msg=f"{method} {kw} {name}")
            for gp, rp in zip(jax.tree.leaves(got_p), jax.tree.leaves(ref_p)):
                np.testing.assert_array_equal(np.asarray(gp), np.asarray(rp))
    masks = prune(MODEL, PARAMS, "cap", 0.3, head_scores=scores, mesh=mesh("data4_model2"))[1]
    assert leaf(masks, "norm") is None or leaf(masks, "norm/scale") is None


def check_sequential_stats_on_sharded_params():
    """Wanda's input norms and SparseGPT's Hessians of one layer, sharded params and batch."""
    from capjax.model import layer_context
    from capjax.pruning.methods import layer_slice, layer_stats

    m = sharding.make_mesh({"data": 2, "model": 2})  # 4 of the 8 devices; chunks of 2 split over "data"
    x, ctx = layer_context(MODEL, PARAMS, jnp.asarray(TOKENS), jnp.asarray(AM))
    chunk = lambda a: a.reshape(-1, 2, *a.shape[1:])  # noqa: E731  [C=3, 2, ...]: chunks of 2 sequences
    data = (chunk(x), jax.tree.map(chunk, ctx), chunk(jnp.asarray(AM, jnp.float32)))
    sdata = sharding.shard_batch(data, m, axis=1)
    assert sdata[0].sharding.spec == P(None, "data"), sdata[0].sharding.spec
    for kind in ("norm", "hessian"):
        ref = layer_stats(MODEL, kind, layer_slice(PARAMS, 1), *data)
        got = layer_stats(MODEL, kind, layer_slice(sharding.shard_params(PARAMS, m), 1), *data)
        got2 = layer_stats(MODEL, kind, layer_slice(sharding.shard_params(PARAMS, m), 1), *sdata)
        for p in ref:
            np.testing.assert_allclose(np.asarray(got[p]), np.asarray(ref[p]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(got2[p]), np.asarray(ref[p]), rtol=1e-5, atol=1e-5)


def check_threshold_count_on_sharded_scores():
    m = mesh("data4_model2")
    sp = sharding.shard_params(PARAMS, m)
    imp = importance_from_scores(_scores_and_delta(), (L, H))
    ref_scores = weight_scores(PARAMS, imp, "mean")
    scores = weight_scores(sp, imp, "mean")
    q = scores["layers/self_attn/q_proj/kernel"]
    assert q.sharding.spec == P(None, "data", "model"), q.sharding.spec  # scores inherit the weights' layout
    assert global_threshold(scores, 0.4) == global_threshold(ref_scores, 0.4)
    hlo = count_at_or_below.lower(scores, jnp.int32(0)).compile().as_text()
    assert "all-gather" not in hlo, "counting gathers a sharded score array"
    counts = count_at_or_below(scores, jnp.int32(0))
    ref = count_at_or_below(ref_scores, jnp.int32(0))
    for a, b in zip(counts, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def check_ties_at_the_global_threshold_break_the_same_on_every_layout():
    """Constructed ties: kernels on four magnitudes and head scores of two values make thousands of
    CAP weight scores equal at the global threshold, which splits them. Every layout (one device,
    data x model, data) prunes exactly the weights that a stable sort over the scores in tree
    order prunes: ties go by leaf, then by flat index, whatever the sharding."""
    from capjax.pruning.importance import PRUNABLE

    def few_levels(path, a):
        if sharding._path_name(path) not in PRUNABLE:
            return a
        return jnp.sign(a) * jnp.ceil(jnp.abs(a) / jnp.abs(a).max() * 4) / 4

    params = jax.tree_util.tree_map_with_path(few_levels, PARAMS)
    delta = np.where(np.arange(H) % 2, 2.0, 1.0)[None, :].repeat(L, 0)  # [L, H]
    scores = weight_scores(params, importance_from_scores(delta, (L, H)), "mean")
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(scores)])
    for sparsity in (0.3, 0.5):
        thr = global_threshold(scores, sparsity)
        assert 0 < thr.n_prune - thr.n_below < thr.n_tied and thr.n_tied > 100, thr  # the threshold splits ties
        pruned = np.zeros(flat.size, bool)
        pruned[np.argsort(flat, kind="stable")[: thr.n_prune]] = True
        want, i = {}, 0
        for path in sorted(scores):  # jax.tree.leaves order of a dict: sorted keys
            size = scores[path].size
            want[path] = ~pruned[i : i + size].reshape(scores[path].shape)
            i += size
        for name in (None, *MESHES):
            m = None if name is None else mesh(name)
            masks = prune(MODEL, params, "cap", sparsity, head_scores=delta, mesh=m)[1]
            for path in PRUNABLE:
                np.testing.assert_array_equal(np.asarray(leaf(masks, path)), want[path], err_msg=f"{name} {path}")


def check_evaluation_batches_split_with_masked_padding():
    """Evaluation batches whose size the "data" axis does not divide (1, and partial last batches)
    are padded with masked rows and split, not replicated; the metrics equal those of the same
    calls on unsharded params (the oracle) to 1e-6."""
    from capjax import distributed
    from capjax.evaluate.generate import generate
    from capjax.evaluate.perplexity import continuation_logprobs, perplexity

    stream = np.random.default_rng(2).integers(0, V, 5 * 16).astype(np.int32)
    requests = [(TOKENS[i, :4].tolist(), TOKENS[i, 4 : 4 + 1 + i % 5].tolist()) for i in range(5)]
    prompts = [TOKENS[i, : 3 + i % 4].tolist() for i in range(5)]
    ref_ppl = {b: perplexity(MODEL, PARAMS, stream, seq_len=16, batch_size=b) for b in (1, 3)}
    ref_ll = continuation_logprobs(MODEL, PARAMS, requests, batch_size=3)
    ref_gen = generate(MODEL, PARAMS, prompts, max_new_tokens=4, batch_size=3, eos_ids=())
    for name in MESHES:
        m = mesh(name)
        d = sharding.axis_size(m, "data")
        p = sharding.shard_params(PARAMS, m)
        assert distributed.batch_multiple(p) == d
        tokens, mask = distributed.place_batch(p, np.ones((1, 16), np.int32), np.ones((1, 16), np.int32))
        assert tokens.shape == (d, 16) and tokens.sharding.spec == P("data"), (name, tokens.shape, tokens.sharding)
        assert {s.data.shape for s in tokens.addressable_shards} == {(1, 16)}, name  # one row per data slot
        np.testing.assert_array_equal(np.asarray(mask)[1:], 0)  # the padding rows are masked
        for b in (1, 3):  # 5 windows: batch 1, and 3 + a partial last batch of 2
            got = perplexity(MODEL, p, stream, seq_len=16, batch_size=b)
            np.testing.assert_allclose(got["window_nll"], ref_ppl[b]["window_nll"], rtol=1e-6, err_msg=name)
            assert abs(got["ppl"] - ref_ppl[b]["ppl"]) <= 1e-6 * ref_ppl[b]["ppl"], (name, b, got, ref_ppl[b])
        ll = continuation_logprobs(MODEL, p, requests, batch_size=3)
        np.testing.assert_allclose([x[0] for x in ll], [x[0] for x in ref_ll], rtol=1e-6, atol=1e-6, err_msg=name)
        assert [x[1:] for x in ll] == [x[1:] for x in ref_ll], name
        gen = generate(MODEL, p, prompts, max_new_tokens=4, batch_size=3, eos_ids=())
        assert gen == ref_gen, (name, gen, ref_gen)


def check_init_params_sharded():
    m = mesh("data4_model2")
    p = sharding.init_params_sharded(CONFIG, m, jnp.bfloat16)
    q = leaf(p, "layers/self_attn/q_proj/kernel")
    assert q.dtype == jnp.bfloat16 and q.sharding.spec == P(None, "data", "model")
    assert jax.tree.structure(p) == jax.tree.structure(PARAMS)
    assert float(jnp.std(q.astype(jnp.float32))) < 0.05
    assert bool(jnp.all(leaf(p, "norm/scale") == 1))


# Tiny GQA configs of the families beyond Llama / Mistral / Qwen2 (sliding and global layers,
# soft-caps small enough to bind, qk-norms): hand-written transformers config dicts.
# A 2-layer HF config in the worker's sizes; each family check adds its model_type and fields.
TINY_HF = dict(
    vocab_size=V,
    hidden_size=E,
    intermediate_size=F,
    num_hidden_layers=2,
    num_attention_heads=H,
    num_key_value_heads=K,
    max_position_embeddings=64,
)
FAMILIES = {
    "qwen3": dict(model_type="qwen3", head_dim=8),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=4,
        attn_logit_softcapping=0.1,
        final_logit_softcapping=0.1,
        layer_types=["sliding_attention", "full_attention"],
        hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        hidden_activation="gelu_pytorch_tanh",
    ),
    "phi3": dict(model_type="phi3", sliding_window=4),
}


def _name(path) -> str:
    return "/".join(str(k.key) for k in path)


def check_families_sharded_logits():
    """Each family's params sharded by the default rules (data=4 x model=2) give the logits of the
    unsharded params, with right padding."""
    m = mesh("data4_model2")
    rng = np.random.default_rng(5)
    for name, fields in FAMILIES.items():
        config = ModelConfig.from_hf({**TINY_HF, **fields})
        model = Decoder(config)
        # Random values in init_params' shapes (tracing it is cheaper than compiling it); norms are
        # 1 + noise, so a misplaced leaf changes the logits.
        shapes = jax.eval_shape(lambda config=config: init_params(config, seed=1))
        params = jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.asarray((_name(p).endswith("scale")) + rng.normal(0, 0.3, a.shape), a.dtype), shapes
        )
        sharded = sharding.shard_params(params, m)
        q = leaf(sharded, "layers/self_attn/q_proj/kernel")
        assert q.sharding.spec == P(None, "data", "model"), (name, q.sharding.spec)
        for path, a in jax.tree_util.tree_flatten_with_path(sharded)[0]:
            want = sharding.spec_for(_name(path), a.shape, m)
            assert a.sharding.spec == want, (name, _name(path), a.sharding.spec, want)
        apply = jax.jit(model.apply)
        ref = np.asarray(apply({"params": params}, TOKENS, attention_mask=AM))
        got = np.asarray(apply({"params": sharded}, TOKENS, attention_mask=AM))
        valid = AM.astype(bool)
        np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0, err_msg=name)  # logits ~ 10


def check_streamed_load_equals_shard_params():
    """load_pretrained(mesh=) places each param as it is read: the same values and shardings as
    shard_params(load_pretrained()), for every family (Phi-3's fused qkv included), a stacked leaf
    split over "model" and "data", and the real GGUF when installed."""
    import tempfile

    import capjax
    from capjax.io import smollm2_gguf_path

    m = mesh("data4_model2")
    rng = np.random.default_rng(6)
    sources = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in {"llama": dict(model_type="llama"), **FAMILIES}.items():
            config = ModelConfig.from_hf({**TINY_HF, **fields})
            shapes = jax.eval_shape(lambda config=config: init_params(config, seed=1))
            params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), shapes)
            sources.append(capjax.save_pretrained(Decoder(config), params, os.path.join(tmp, name)))
        try:
            sources.append(smollm2_gguf_path())
        except FileNotFoundError:
            pass
        for source in sources:
            _, want = capjax.load_pretrained(source)
            want = sharding.shard_params(want, m)
            _, got = capjax.load_pretrained(source, mesh=m)
            flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
            flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
            assert [p for p, _ in flat_got] == [p for p, _ in flat_want], source
            for (path, w), g in zip(flat_want, (g for _, g in flat_got)):
                assert g.sharding == w.sharding, (source, _name(path), g.sharding.spec, w.sharding.spec)
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{source} {_name(path)}")
            q = leaf(got, "layers/self_attn/q_proj/kernel")
            if str(source).endswith(".gguf"):  # SmolLM2's 9 heads and 576 = 4 * 144 hidden: data only
                assert q.sharding.spec == P(None, "data"), q.sharding.spec
            else:
                assert q.sharding.spec == P(None, "data", "model"), (source, q.sharding.spec)


def check_params_fit_counts_one_devices_share():
    """With a mesh, the load-time memory check asks each device for its shards only: the count
    equals the bytes a device really holds after load_pretrained(mesh=), and an 8B model refused
    on one 16 GiB device fits when sharded over 8."""
    import tempfile

    import pytest

    import capjax
    from capjax import memory

    m = mesh("data4_model2")
    config = ModelConfig.from_hf({**TINY_HF, "model_type": "llama"})
    params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), jax.eval_shape(lambda: init_params(config)))
    with tempfile.TemporaryDirectory() as tmp:
        _, got = capjax.load_pretrained(capjax.save_pretrained(Decoder(config), params, tmp), mesh=m)
    for device in m.devices.flat:
        held = sum(s.data.nbytes for a in jax.tree.leaves(got) for s in a.addressable_shards if s.device == device)
        assert held == memory.sharded_params_bytes(config, jnp.float32, m), (device, held)

    llama8b = ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128)
    total, largest = memory.params_bytes(llama8b, jnp.bfloat16)
    share = memory.sharded_params_bytes(llama8b, jnp.bfloat16, m)
    assert total / 8 <= share < total / 4
    gpu = FakeAccelerator(share + 1000, 1000)
    memory.check_params_fit(llama8b, jnp.bfloat16, gpu, host_bytes=largest, mesh=m)
    with pytest.raises(memory.InsufficientMemoryError, match="its params need 14.96 GiB"):
        memory.check_params_fit(llama8b, jnp.bfloat16, gpu, host_bytes=largest)
    with pytest.raises(memory.InsufficientMemoryError, match="its params sharded over 8 devices need"):
        memory.check_params_fit(llama8b, jnp.bfloat16, FakeAccelerator(share + 1000, 1001), host_bytes=largest, mesh=m)
    # CPU: this process's 8 devices live in host RAM, plus the leaf being staged
    memory.check_params_fit(llama8b, jnp.bfloat16, m.devices.flat[0], host_bytes=8 * share + largest, mesh=m)
    with pytest.raises(memory.InsufficientMemoryError, match="host RAM"):
        memory.check_params_fit(llama8b, jnp.bfloat16, m.devices.flat[0], host_bytes=8 * share + largest - 1, mesh=m)


def main() -> None:
    checks = {k: v for k, v in globals().items() if k.startswith("check_")}
    wanted = sys.argv[2:] or list(checks)
    out = run_checks(checks, wanted)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
