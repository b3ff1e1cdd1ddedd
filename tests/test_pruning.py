"""Tests for capjax.pruning against independent oracles (numpy loops, a PyTorch Wanda/SparseGPT)."""

from __future__ import annotations

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import capjax  # noqa: E402
from capjax.model import apply_layer, layer_context, layer_params  # noqa: E402
from capjax.pruning import (  # noqa: E402
    METHODS,
    PRUNABLE,
    apply_masks,
    fasterprune,
    global_threshold,
    importance_from_scores,
    keep_above_kth,
    keep_all_but_lowest,
    keep_global,
    prune,
    sparsity_report,
    weight_scores,
)
from capjax.pruning.importance import rows_view  # noqa: E402
from capjax.sites import PROJECTION_INPUT, Interventions  # noqa: E402

L, E, F, H, K, D, V = 2, 32, 48, 4, 2, 8, 101
G = H // K
NAMES = {p: p.split("/")[2] for p in PRUNABLE}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=K,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(folder)
    model, params = capjax.load_pretrained(folder)
    return types.SimpleNamespace(folder=folder, hf=hf, model=model, params=params)


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (6, 16)).astype(np.int32)
    am = np.ones_like(tokens)
    am[1, 11:] = 0
    am[4, 6:] = 0
    tokens[am == 0] = 0
    return types.SimpleNamespace(tokens=tokens, attention_mask=am)  # a CalibrationBatch look-alike


@pytest.fixture(scope="module")
def delta():
    return np.random.default_rng(2).normal(size=(L, H))


def oracle_importance(d):
    d = np.asarray(d, np.float64)
    return 1 + 9 * (d - d.min()) / (d.max() - d.min())


def hf_prune_mask(keep, path, layer):
    """capjax keep mask [L, ...] -> prune mask [out, in] of HF's weight for `layer`."""
    return ~np.asarray(rows_view(jnp.asarray(keep[layer]), path, stacked=False)).T


def get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


# ---------------------------------------------------------------------------- importance
def test_importance_map():
    d = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 3.0, -1.0, 0.25]])
    I = np.asarray(importance_from_scores(d))
    assert I.shape == (2, 4)
    np.testing.assert_allclose(I, 1 + 9 * (d + 1) / 4, rtol=1e-6)
    assert I.min() == 1.0 and I.max() == 10.0
    obj = types.SimpleNamespace(delta=jnp.asarray(d))  # HeadScores-like
    np.testing.assert_array_equal(np.asarray(importance_from_scores(obj)), I)
    np.testing.assert_array_equal(np.asarray(importance_from_scores(np.full((2, 4), 0.3))), np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        importance_from_scores(np.where(d > 2.5, np.nan, d))
    with pytest.raises(ValueError, match=r"expected \[L, H\] = \[2, 3\]"):
        importance_from_scores(d, (2, 3))


@pytest.mark.parametrize("kv_rule", ["mean", "max"])
def test_weight_scores_every_weight(tiny, delta, kv_rule):
    I = oracle_importance(delta)
    S = {p: np.asarray(s) for p, s in weight_scores(tiny.params, importance_from_scores(delta), kv_rule).items()}
    W = {p: np.asarray(get(tiny.params, p)) for p in PRUNABLE}
    kv_fn = np.mean if kv_rule == "mean" else np.max
    for p in PRUNABLE:
        expected = np.empty(W[p].shape)
        for idx in np.ndindex(*W[p].shape):
            l = idx[0]
            if NAMES[p] == "q_proj":  # [L, E, H, D]
                f = I[l, idx[2]]
            elif NAMES[p] == "o_proj":  # [L, H, D, E]
                f = I[l, idx[1]]
            elif NAMES[p] in ("k_proj", "v_proj"):  # [L, E, K, D]: heads k*G .. k*G+G-1
                kv = idx[2]
                f = kv_fn([I[l, kv * G + g] for g in range(G)])
            else:
                f = np.mean(I[l])
            expected[idx] = abs(W[p][idx]) * f
        np.testing.assert_allclose(S[p], expected, rtol=1e-5, err_msg=p)


# ---------------------------------------------------------------------------- thresholds
def _score_tree(seed, quantize=None):
    rng = np.random.default_rng(seed)
    tree = {"a": rng.random((3, 40, 7)), "b": {"c": rng.random((3, 50)), "d": rng.random((2, 5, 5, 3))}}
    if quantize:
        tree = jax.tree.map(lambda x: np.floor(x * quantize) / quantize, tree)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _oracle_global(tree, sparsity):
    """Exact count with stable-sort ties over the leaves concatenated in tree order."""
    leaves, treedef = jax.tree.flatten(tree)
    flat = np.concatenate([np.asarray(x).ravel() for x in leaves])
    k = int(round(sparsity * flat.size))
    pruned = np.zeros(flat.size, bool)
    pruned[np.argsort(flat, kind="stable")[:k]] = True
    out, i = [], 0
    for x in leaves:
        out.append(pruned[i : i + x.size].reshape(x.shape))
        i += x.size
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("quantize", [None, 4, 1])
@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.5])
def test_global_threshold_exact_with_ties(sparsity, quantize):
    tree = _score_tree(0, quantize)
    got = keep_global(tree, sparsity)  # keep masks
    want = _oracle_global(tree, sparsity)  # pruned
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(~np.asarray(g), w)
    thr = global_threshold(tree, sparsity)
    n = sum(x.size for x in jax.tree.leaves(tree))
    assert thr.n_prune == sum(int((~np.asarray(g)).sum()) for g in jax.tree.leaves(got)) == round(sparsity * n)


def test_rowwise_rules_match_sort():
    rng = np.random.default_rng(3)
    x = np.floor(rng.random((5, 37)) * 6).astype(np.float32)  # many ties
    x[0, 3] = -0.0
    x[1, :] = -np.arange(37)
    for k in (0, 1, 10, 36):
        want = np.zeros(x.shape, bool)
        np.put_along_axis(want, np.argsort(x, axis=1, kind="stable")[:, :k], True, axis=1)
        for method in ("sort", "bisect"):  # keep masks: the k lowest are the ones dropped
            np.testing.assert_array_equal(~np.asarray(keep_all_but_lowest(jnp.asarray(x), k, method)), want)
        got = ~np.asarray(keep_above_kth(jnp.asarray(x), k))
        assert got.dtype == bool
        want = x <= np.sort(x, axis=1)[:, max(k - 1, 0)][:, None] if k else np.zeros_like(got)
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- CAP
def _quantized(params, levels=8):
    """Kernels rounded away from zero onto a few values: many tied scores, no zeros."""

    def q(path, a):
        keys = "/".join(str(k.key) for k in path)
        if keys not in PRUNABLE:
            return a
        s = float(jnp.abs(a).max())
        return jnp.sign(a) * jnp.ceil(jnp.abs(a) / s * levels) * s / levels

    return jax.tree_util.tree_map_with_path(q, params)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.5])
def test_cap_global_sparsity_and_order(tiny, delta, sparsity, quantize):
    params = _quantized(tiny.params) if quantize else tiny.params
    pruned, masks = prune(tiny.model, params, "cap", sparsity, head_scores=delta)
    rep = sparsity_report(pruned)
    assert abs(rep.total - sparsity) <= 1e-4
    # the pruned weights are exactly the lowest |W| * I under the tie rule
    I = oracle_importance(delta)
    f = {
        "q_proj": I[:, None, :, None],
        "o_proj": I[:, :, None, None],
        "k_proj": I.reshape(L, K, G).mean(-1)[:, None, :, None],
        "mlp": I.mean(-1)[:, None, None],
    }
    f["v_proj"] = f["k_proj"]
    scores = {
        p: jnp.asarray(np.abs(np.asarray(get(params, p))) * f.get(NAMES[p], f["mlp"]), jnp.float32) for p in PRUNABLE
    }
    want = _oracle_global(scores, sparsity)
    # the oracle's float64 factors may round a product differently: allow a couple of swaps
    mismatched = sum(int((~np.asarray(get(masks, p)) != want[p]).sum()) for p in PRUNABLE)
    assert mismatched <= 4, mismatched


def test_cap_layer_scope_and_kv_max(tiny, delta):
    _, masks = prune(tiny.model, tiny.params, "cap", 0.3, head_scores=delta, scope="layer", kv_rule="max")
    for p in PRUNABLE:
        m = np.asarray(get(masks, p))
        for l in range(L):
            assert (~m[l]).sum() == round(0.3 * m[l].size)
    _, mean_masks = prune(tiny.model, tiny.params, "cap", 0.3, head_scores=delta, scope="layer")
    assert not np.array_equal(np.asarray(get(masks, PRUNABLE_K)), np.asarray(get(mean_masks, PRUNABLE_K)))
    q = "layers/self_attn/q_proj/kernel"
    np.testing.assert_array_equal(np.asarray(get(masks, q)), np.asarray(get(mean_masks, q)))


PRUNABLE_K = "layers/self_attn/k_proj/kernel"


def test_magnitude_matches_wanda_rule(tiny):
    pruned, masks = prune(tiny.model, tiny.params, "magnitude", 0.3)
    for p in PRUNABLE:
        for l in range(L):
            Wt = np.abs(np.asarray(get(tiny.params, p))[l]).ravel()
            thresh = np.sort(Wt)[int(Wt.size * 0.3)]
            np.testing.assert_array_equal(~np.asarray(get(masks, p))[l].ravel(), Wt <= thresh)
    _, gm = prune(tiny.model, tiny.params, "magnitude", 0.3, scope="global")
    scores = {p: jnp.abs(get(tiny.params, p)) for p in PRUNABLE}
    want = _oracle_global(scores, 0.3)
    for p in PRUNABLE:
        np.testing.assert_array_equal(~np.asarray(get(gm, p)), want[p])


# ---------------------------------------------------------------------------- Wanda vs a PyTorch reimplementation
def torch_wanda(hf, tokens, am, sparsity, nm=None, factor=None):
    """Wanda's prune_wanda, layer by layer on a copy of the HF model: pre-hooks accumulate ||X_j||^2
    over real tokens, then each Linear's rows are pruned (stable sort or N:M topk)."""
    model = copy.deepcopy(hf)
    tok, att = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(am)
    real = att.reshape(-1).bool()
    out = {}
    for i, layer in enumerate(model.model.layers):
        lins = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sq = {n: torch.zeros(m.in_features) for n, m in lins.items()}

        def hook(name, sq=sq):
            def f(_, args):
                x = args[0].reshape(-1, args[0].shape[-1])[real].float()
                sq[name] += (x**2).sum(0)

            return f

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in lins.items()]
        with torch.no_grad():
            model(input_ids=tok, attention_mask=att)
        for h in handles:
            h.remove()
        for n, m in lins.items():
            W = m.weight.data
            metric = W.abs() * torch.sqrt(sq[n] / real.sum()).reshape(1, -1)
            if factor is not None:
                metric = metric * factor(i, n.split(".")[-1])
            mask = torch.zeros_like(W, dtype=torch.bool)
            if nm:
                for c in range(0, W.shape[1], nm[1]):
                    idx = torch.topk(metric[:, c : c + nm[1]], nm[0], dim=1, largest=False)[1]
                    mask.scatter_(1, c + idx, True)
            else:
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * sparsity)]
                mask.scatter_(1, idx, True)
            W[mask] = 0
            out[(i, n.split(".")[-1])] = mask.numpy()
    return out


def _compare_to_torch(masks, ref):
    for p in PRUNABLE:
        for l in range(L):
            np.testing.assert_array_equal(
                hf_prune_mask(get(masks, p), p, l), ref[(l, NAMES[p])], err_msg=f"layer {l} {p}"
            )


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wanda_matches_torch(tiny, calib, nm):
    _, masks = prune(tiny.model, tiny.params, "wanda", 0.5 if nm else 0.4, calib=calib, nm=nm, batch_size=4)
    _compare_to_torch(masks, torch_wanda(tiny.hf, calib.tokens, calib.attention_mask, 0.4, nm))


def test_wanda_matches_torch_with_alternating_sliding_layers(tmp_path, calib):
    """Gemma 2 (layer 0 sliding, window 4 < T; layer 1 global): the sequential pass runs each layer
    alone on the one layer scan with its own index, so each layer keeps its attention type."""
    from conftest import make_hf_model
    from test_families import CASES

    model_type, overrides = CASES["gemma2_gqa"]
    hf = make_hf_model(tmp_path, model_type, randomize_norms=True, **overrides)
    model, params = capjax.load_pretrained(tmp_path)
    assert model.config.mixed_layers and model.config.num_layers == L
    _, masks = prune(model, params, "wanda", 0.4, calib=calib, batch_size=4)
    _compare_to_torch(masks, torch_wanda(hf, calib.tokens, calib.attention_mask, 0.4))


def test_cap_wanda_matches_torch(tiny, calib, delta):
    I = torch.as_tensor(oracle_importance(delta), dtype=torch.float32)

    def factor(l, name):  # HF [out, in] layout: q/k/v rows h*D + d, o columns h*D + d
        if name == "q_proj":
            return I[l].repeat_interleave(D)[:, None]
        if name in ("k_proj", "v_proj"):
            return I[l].reshape(K, G).mean(-1).repeat_interleave(D)[:, None]
        if name == "o_proj":
            return I[l].repeat_interleave(D)[None, :]
        return I[l].mean()

    _, masks = prune(tiny.model, tiny.params, "cap_wanda", 0.4, head_scores=delta, calib=calib)
    _compare_to_torch(masks, torch_wanda(tiny.hf, calib.tokens, calib.attention_mask, 0.4, factor=factor))


# ---------------------------------------------------------------------------- SparseGPT
def torch_fasterprune(W, H, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT's column sweep written out in PyTorch (float32), for one matrix."""
    W, H = W.clone().float(), H.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hb = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hb)
        if nm is None:
            tmp = W1**2 / d[None] ** 2
            m1 = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        else:
            m1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]][None] ** 2
                m1.scatter_(1, i + torch.topk(tmp, nm[0], dim=1, largest=False)[1], True)
            q = torch.where(m1[:, i], 0.0, W1[:, i])
            err = (W1[:, i] - q) / d[i]
            W1[:, i:] -= err[:, None] * Hb[i, i:][None]
            Q1[:, i], E1[:, i] = q, err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
        pruned[:, i1:i2] = m1
    return W, pruned


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_fasterprune_matches_torch(nm):
    rng = np.random.default_rng(4)
    n_in, n_out = 300, 24  # three blocks, the last one partial
    X = rng.normal(size=(n_in, 500)) * rng.uniform(0.1, 3, (n_in, 1))
    X[:, :100] += X[:1, :100]  # correlated inputs
    X[7] = 0  # a dead input
    H = (2 * X @ X.T / X.shape[1]).astype(np.float32)
    W = rng.normal(size=(n_out, n_in)).astype(np.float32)
    Wt, Pt = torch_fasterprune(torch.as_tensor(W), torch.as_tensor(H), 0.5, nm)
    Wj, keep = fasterprune(W, H, 0.5, nm)
    Pj = ~np.asarray(keep)
    np.testing.assert_array_equal(Pj, Pt.numpy())
    np.testing.assert_allclose(np.asarray(Wj), Wt.numpy(), atol=2e-4, rtol=1e-3)
    assert np.all(np.asarray(Wj)[Pj] == 0) and np.all(np.asarray(Wj)[:, 7] == 0)


def test_fasterprune_cholesky_failure_raises_damping():
    H = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)  # indefinite
    W = np.ones((2, 3), np.float32)
    with pytest.warns(RuntimeWarning, match="Cholesky failed"):
        Wn, P = fasterprune(W, H, 0.3)
    assert np.all(np.isfinite(np.asarray(Wn)))


def test_sparsegpt_beats_magnitude_reconstruction(tiny, calib):
    sparsity = 0.5
    pruned, masks = prune(tiny.model, tiny.params, "sparsegpt", sparsity, calib=calib)
    x, ctx = layer_context(tiny.model, tiny.params, jnp.asarray(calib.tokens), jnp.asarray(calib.attention_mask))
    real = calib.attention_mask.reshape(-1).astype(bool)
    run = jax.jit(apply_layer, static_argnums=0)
    capture = Interventions(capture=frozenset(PROJECTION_INPUT.values()))
    for l in range(L):
        _, inputs = run(tiny.model, layer_params(tiny.params, l), x, ctx, iv=capture)
        for p in PRUNABLE:
            _, group, name, _ = p.split("/")
            X = np.asarray(inputs[PROJECTION_INPUT[f"{group}/{name}"]]).reshape(real.size, -1)[real]  # [tokens, n_in]
            W0 = np.asarray(rows_view(get(tiny.params, p)[l], p, stacked=False))
            Ws = np.asarray(rows_view(get(pruned, p)[l], p, stacked=False))
            k = int((~np.asarray(get(masks, p))[l]).sum())
            assert abs(k / W0.size - sparsity) < 0.02
            Wm = W0.copy().ravel()
            Wm[np.argsort(np.abs(Wm), kind="stable")[:k]] = 0  # magnitude at the same count
            err_s = np.linalg.norm(X @ (W0 - Ws))
            err_m = np.linalg.norm(X @ (W0 - Wm.reshape(W0.shape)))
            assert err_s < err_m, (l, p, err_s, err_m)
        x = run(tiny.model, layer_params(pruned, l), x, ctx)


# ---------------------------------------------------------------------------- N:M, structure, invariants
@pytest.mark.parametrize(
    "method, nm",
    [
        ("cap", (2, 4)),
        ("cap", (4, 8)),
        ("magnitude", (2, 4)),
        ("random", (4, 8)),
        ("wanda", (4, 8)),
        ("sparsegpt", (2, 4)),
        ("sparsegpt", (4, 8)),
        ("cap_wanda", (2, 4)),
    ],
)
def test_nm_every_group(tiny, calib, delta, method, nm):
    for n, m in (nm,):
        pruned, masks = prune(tiny.model, tiny.params, method, 0.0, head_scores=delta, calib=calib, nm=(n, m))
        for p in PRUNABLE:
            rows = np.asarray(rows_view(get(masks, p), p))  # [L, in, out], True = kept
            groups = rows.reshape(L, rows.shape[1] // m, m, rows.shape[2])
            assert np.all((~groups).sum(axis=2) == n), (method, p, n, m)
            w = np.asarray(rows_view(get(pruned, p), p)).reshape(groups.shape)
            assert np.all((w != 0).sum(axis=2) <= m - n)


def test_cap_heads_structure(tiny):
    d = np.array([[0.0, 0.1, 5.0, 6.0], [7.0, 8.0, 0.2, 9.0]])  # lowest: (0,0), (0,1), (1,2)
    pruned, masks = prune(tiny.model, tiny.params, "cap_heads", 0.375, head_scores=d)
    removed = np.zeros((L, H), bool)
    removed[0, 0] = removed[0, 1] = removed[1, 2] = True
    kv_removed = np.array([[True, False], [False, False]])  # layer 1 group 1 keeps head 3
    for p in PRUNABLE:
        w0, w, keep = (np.asarray(get(t, p)) for t in (tiny.params, pruned, masks))
        for idx in np.ndindex(*w.shape):
            l = idx[0]
            if NAMES[p] == "q_proj":
                gone = removed[l, idx[2]]
            elif NAMES[p] == "o_proj":
                gone = removed[l, idx[1]]
            elif NAMES[p] in ("k_proj", "v_proj"):
                gone = kv_removed[l, idx[2]]
            else:
                gone = False
            assert keep[idx] == (not gone)
            assert w[idx] == (0.0 if gone else w0[idx])


@pytest.mark.parametrize("method", list(METHODS))
def test_masks_and_untouched_leaves(tiny, calib, delta, method):
    pruned, masks = prune(tiny.model, tiny.params, method, 0.3, head_scores=delta, calib=calib)

    def paths(t):
        return [
            "/".join(str(k.key) for k in p)
            for p, _ in jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: x is None)[0]
        ]

    assert paths(pruned) == paths(tiny.params) == paths(masks)
    for path, p0, p1, m in zip(
        paths(tiny.params),
        jax.tree.leaves(tiny.params),
        jax.tree.leaves(pruned),
        jax.tree.leaves(masks, is_leaf=lambda x: x is None),
    ):
        if path not in PRUNABLE:
            assert m is None
            assert p1.dtype == p0.dtype and np.array_equal(np.asarray(p1), np.asarray(p0)), path
            continue
        assert m.dtype == jnp.bool_ and m.shape == p0.shape and p1.dtype == p0.dtype
        if method == "sparsegpt":  # kept weights carry OBS updates; pruned ones are zero
            assert np.all(np.asarray(p1)[~np.asarray(m)] == 0)
            assert not np.allclose(np.asarray(p1)[np.asarray(m)], np.asarray(p0)[np.asarray(m)])
        else:
            np.testing.assert_array_equal(np.asarray(p1), np.asarray(p0) * np.asarray(m))
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(apply_masks(pruned, masks))[3]), np.asarray(jax.tree.leaves(pruned)[3])
    )


def test_random_is_seeded(tiny):
    a = prune(tiny.model, tiny.params, "random", 0.3, seed=1)[1]
    b = prune(tiny.model, tiny.params, "random", 0.3, seed=1)[1]
    c = prune(tiny.model, tiny.params, "random", 0.3, seed=2)[1]
    q = "layers/mlp/up_proj/kernel"
    assert np.array_equal(get(a, q), get(b, q)) and not np.array_equal(get(a, q), get(c, q))
    assert (~np.asarray(get(a, q))).sum() == 2 * round(0.3 * E * F)


def test_sparsity_zero_is_identity(tiny, delta):
    pruned, masks = prune(tiny.model, tiny.params, "magnitude", 0.0)
    assert sparsity_report(pruned).total == 0.0
    assert all(bool(np.all(get(masks, p))) for p in PRUNABLE)


def test_sparsity_report(tiny):
    params = jax.tree.map(lambda a: a, tiny.params)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    params["layers"]["self_attn"]["q_proj"]["kernel"] = q.at[1, :, 0, :].set(0.0)  # E * D zeros
    down = params["layers"]["mlp"]["down_proj"]["kernel"]
    params["layers"]["mlp"]["down_proj"]["kernel"] = down.at[0, :10, :].set(0.0)  # 10 * E zeros
    rep = sparsity_report(params)
    assert rep.matrix(1, "self_attn.q_proj") == pytest.approx(1 / H)
    assert rep.matrix(0, "mlp.down_proj") == pytest.approx(10 / F)
    assert rep.matrix(0, "self_attn.q_proj") == 0.0
    per_layer = E * H * D * 2 + E * K * D * 2 + 3 * E * F
    assert rep.layer(1) == pytest.approx(E * D / per_layer)
    assert rep.total == pytest.approx((E * D + 10 * E) / (2 * per_layer))
    d = rep.to_dict()
    assert d["numel"] == 2 * per_layer and d["zeros"] == E * D + 10 * E
    assert d["matrices"]["layers.0.mlp.down_proj"]["zeros"] == 10 * E
    assert "q_proj" in rep.table() and "total sparsity" in rep.table()
    # masks are applied before counting
    masks = jax.tree.map(lambda _: None, tiny.params)
    masks["layers"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((L, E, F), bool)
    assert sparsity_report(tiny.params, masks).matrix(1, "mlp.up_proj") == 1.0


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs(tiny, calib, delta):
    m, p = tiny.model, tiny.params
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune(m, p, "magnitude", 1.0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune(m, p, "magnitude", -0.1)
    with pytest.raises(ValueError, match="N < M"):
        prune(m, p, "magnitude", 0.5, nm=(4, 4))
    with pytest.raises(ValueError, match="N < M"):
        prune(m, p, "magnitude", 0.5, nm="5:4")
    with pytest.raises(ValueError, match="needs head_scores"):
        prune(m, p, "cap", 0.5)
    with pytest.raises(ValueError, match=r"shape \[4, 2\], expected \[L, H\] = \[2, 4\]"):
        prune(m, p, "cap", 0.5, head_scores=delta.T)
    with pytest.raises(ValueError, match="NaN"):
        prune(m, p, "cap", 0.5, head_scores=np.full((L, H), np.nan))
    with pytest.raises(ValueError, match="needs calib"):
        prune(m, p, "wanda", 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        prune(m, p, "sparsegpt", 0.5, calib={"tokens": np.zeros((0, 8), np.int32)})
    with pytest.raises(ValueError, match="no tokens"):
        prune(m, p, "wanda", 0.5, calib=types.SimpleNamespace(tokens=None, attention_mask=None))
    with pytest.raises(ValueError, match="no real tokens"):
        prune(m, p, "wanda", 0.5, calib={"tokens": calib.tokens, "attention_mask": 0 * calib.attention_mask})
    with pytest.raises(ValueError, match="known methods: cap, cap_wanda, cap_heads, wanda, sparsegpt"):
        prune(m, p, "obs", 0.5)
    with pytest.raises(ValueError, match="does not take option"):
        prune(m, p, "magnitude", 0.5, kv_rule="max")
    with pytest.raises(ValueError, match="kv_rule='median'"):
        prune(m, p, "cap", 0.5, head_scores=delta, kv_rule="median")
    with pytest.raises(ValueError, match="N:M"):
        prune(m, p, "cap_heads", 0.5, head_scores=delta, nm=(2, 4))
    nan_params = jax.tree.map(lambda a: a, p)
    nan_params["layers"]["mlp"]["up_proj"]["kernel"] = p["layers"]["mlp"]["up_proj"]["kernel"].at[1, 2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN or Inf weights in layers/mlp/up_proj/kernel"):
        prune(m, nan_params, "magnitude", 0.5)
    with pytest.raises(ValueError, match="divisible by 8"):
        prune(
            m,
            jax.tree.map(lambda a: a, p)
            | {"layers": {**p["layers"], "mlp": {**p["layers"]["mlp"], "down_proj": {"kernel": jnp.ones((L, 44, E))}}}},
            "magnitude",
            0.5,
            nm=(4, 8),
        )


def test_nm_sparsity_mismatch_is_refused(tiny):
    with pytest.raises(ValueError, match="N:M 2:4 sets the sparsity to 0.5; pass sparsity=0"):
        prune(tiny.model, tiny.params, "magnitude", 0.3, nm=(2, 4))
    inf_params = jax.tree.map(lambda a: a, tiny.params)
    inf_params["layers"]["self_attn"]["o_proj"]["kernel"] = (
        tiny.params["layers"]["self_attn"]["o_proj"]["kernel"].at[0, 0, 0, 0].set(jnp.inf)
    )
    with pytest.raises(ValueError, match="NaN or Inf weights in layers/self_attn/o_proj/kernel"):
        prune(tiny.model, inf_params, "magnitude", 0.5)
    with pytest.raises(ValueError, match="option batch_size=0: expected a positive int"):
        prune(tiny.model, tiny.params, "wanda", 0.5, calib={"tokens": np.ones((1, 4), np.int32)}, batch_size=0)
