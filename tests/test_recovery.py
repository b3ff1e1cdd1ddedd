"""Recovery after pruning: exact sparsity, a PyTorch AdamW oracle, LoRA against W + BA in PyTorch,
bit-identical resume, divergence and bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import capjax
from capjax.convert import iter_hf_tensors
from capjax.pruning.importance import PRUNABLE, get_path
from capjax.recovery import (
    LoRARankError,
    MaskTreeError,
    RecoveryDataError,
    RecoveryDivergedError,
    RecoverySettings,
    RecoverySettingsError,
    batch_loss,
    init_lora,
    memory_bytes,
    merge_lora,
    recover,
)
from capjax.recovery.lora import set_path
from conftest import TINY, make_hf_model

# One settings object for the tests that share a compiled step (compiled once per mode).
FAST = dict(steps=3, batch_size=4, grad_accum=2, warmup_steps=1, lr=3e-3, rank=4, remat=False, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_recovery")
    hf = make_hf_model(folder, "llama")
    model, params = capjax.load_pretrained(folder)
    return folder, hf, model, params


def _data(n=6, T=16, V=TINY["vocab_size"], seed=0):
    """Every example fully real; the second half of each is the answer."""
    tokens = np.random.RandomState(seed).randint(0, V, (n, T)).astype(np.int32)
    loss_mask = np.zeros((n, T), np.float32)
    loss_mask[:, T // 2 :] = 1
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": np.ones((n, T), np.int32)}


def _masks_for(method, model, params):
    data = _data()
    if method == "wanda":
        return capjax.prune(model, params, "wanda", 0.5, calib=data)
    if method == "wanda_2:4":
        return capjax.prune(model, params, "wanda", 0.5, calib=data, nm="2:4")
    if method == "cap":
        delta = np.random.RandomState(1).rand(model.config.num_layers, model.config.num_heads)
        return capjax.prune(model, params, "cap", 0.5, head_scores=delta)
    if method == "magnitude_4:8":
        return capjax.prune(model, params, "magnitude", 0.5, nm="4:8")
    return capjax.prune(model, params, method, 0.5)


def _zeros_per_matrix(params, masks):
    """{path: (zeros per layer, pruned per layer, any nonzero at a pruned entry)}."""
    out = {}
    for p in PRUNABLE:
        w, m = np.asarray(get_path(params, p)), np.asarray(get_path(masks, p))
        L = w.shape[0]
        out[p] = (
            (w.reshape(L, -1) == 0).sum(1).tolist(),
            (~m).reshape(L, -1).sum(1).tolist(),
            bool(np.any(w[~m] != 0)),
        )
    return out


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "cap", "random", "wanda_2:4", "magnitude_4:8"])
def test_sparsity_exact_after_every_step_and_merge(tiny, method, mode):
    _, _, model, params = tiny
    pruned, masks = _masks_for(method, model, params)
    expected = _zeros_per_matrix(pruned, masks)
    seen = []

    def check(step, trainable):
        if mode == "full":
            seen.append(step)
            assert _zeros_per_matrix(trainable, masks) == expected, f"step {step}"

    out, history = recover(model, pruned, masks, _data(), mode=mode, callback=check, **FAST)
    assert _zeros_per_matrix(out, masks) == expected
    assert all(not any_nonzero for _, _, any_nonzero in expected.values())
    assert seen == ([1, 2, 3] if mode == "full" else [])
    # the kept weights did move
    moved = sum(int(np.sum(np.asarray(get_path(out, p)) != np.asarray(get_path(pruned, p)))) for p in PRUNABLE)
    assert moved > 0
    assert history["mode"] == mode and len(history["loss"]) == 3


def _hf_masks(config, masks, params):
    """HF-named float masks (1 = kept): the masks in the params' layout, 1 at unpruned leaves."""
    tree = jax.tree.map(lambda a: np.ones(a.shape, np.float32), params)
    for p in PRUNABLE:
        tree = set_path(tree, p, np.asarray(get_path(masks, p)).astype(np.float32))
    return dict(iter_hf_tensors(config, tree))


def _torch_loss(hf, data):
    tokens = torch.as_tensor(data["tokens"]).long()
    logits = hf(tokens).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    w = torch.as_tensor(data["loss_mask"][:, 1:])
    return (nll * w).sum() / w.sum()


def test_one_full_step_equals_torch_adamw(tiny, tmp_path):
    _, _, model, params = tiny
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    data = _data()
    hp = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.1)
    out, history = recover(
        model,
        pruned,
        masks,
        data,
        steps=1,
        mode="full",
        batch_size=6,
        warmup_steps=0,
        grad_clip=None,
        remat=False,
        progress=False,
        **hp,
    )
    lr0 = capjax.recovery.lr_schedule(RecoverySettings(steps=1, warmup_steps=0, lr=hp["lr"]))(0)
    assert float(lr0) == pytest.approx(hp["lr"], rel=1e-7)  # step 0 of the schedule is the peak (float32)

    capjax.save_pretrained(model, pruned, tmp_path / "pruned")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    hf.train()  # no dropout in Llama; train() only to be explicit
    hf_masks = {k: torch.as_tensor(v) for k, v in _hf_masks(model.config, masks, pruned).items()}
    named = dict(hf.named_parameters())
    opt = torch.optim.AdamW(
        named.values(), lr=float(lr0), betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["weight_decay"]
    )
    loss = _torch_loss(hf, data)
    loss.backward()
    with torch.no_grad():
        for name, p in named.items():
            p.grad *= hf_masks[name]
    opt.step()
    assert history["loss"][0] == pytest.approx(float(loss.detach()), abs=1e-5)
    ours = dict(iter_hf_tensors(model.config, out))
    worst = max(float(np.abs(ours[n] - p.detach().numpy()).max()) for n, p in named.items())
    assert worst < 1e-5
    # the step moved the kept weights by about lr (so the comparison is not of unchanged weights)
    before = dict(iter_hf_tensors(model.config, pruned))
    assert max(float(np.abs(ours[n] - before[n]).max()) for n in named) > 0.5 * hp["lr"]


def test_lora_forward_equals_w_plus_ba_in_torch(tiny, tmp_path):
    _, _, model, params = tiny
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    rank, scale = 3, 2.0
    adapters = init_lora(pruned, rank, jax.random.PRNGKey(0))
    rs = np.random.RandomState(2)
    adapters = {
        p: {"a": ab["a"], "b": jnp.asarray(rs.normal(0, 0.05, ab["b"].shape), np.float32)} for p, ab in adapters.items()
    }
    data = _data()
    ours = batch_loss(model, pruned, data, adapters=adapters, masks=masks, scale=scale)

    capjax.save_pretrained(model, pruned, tmp_path / "pruned")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    hf_masks = _hf_masks(model.config, masks, pruned)
    with torch.no_grad():
        for p, ab in adapters.items():
            hf_name = ".".join(p.split("/")[1:3])
            for l in range(model.config.num_layers):
                name = f"model.layers.{l}.{hf_name}.weight"
                W = dict(hf.named_parameters())[name]
                A = torch.as_tensor(np.array(ab["a"][l])).T  # [r, in]
                B = torch.as_tensor(np.array(ab["b"][l])).T  # [out, r]
                W.copy_(torch.as_tensor(hf_masks[name]) * (W + scale * B @ A))
        ref = float(_torch_loss(hf, data))
    assert ours == pytest.approx(ref, abs=1e-5)
    merged = merge_lora(pruned, adapters, masks, scale)
    assert batch_loss(model, merged, data) == pytest.approx(ours, abs=1e-6)
    assert _zeros_per_matrix(merged, masks) == _zeros_per_matrix(pruned, masks)
    # the adapters change the loss (the comparison is not of the bare pruned model)
    assert abs(batch_loss(model, pruned, data) - ours) > 1e-3


def test_resume_after_kill_is_bit_identical(tiny, tmp_path):
    _, _, model, params = tiny
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    kw = dict(FAST, checkpoint_every=2, mode="full")  # checkpoints after steps 2 and 3
    full, h_full = recover(model, pruned, masks, _data(), checkpoint_dir=tmp_path / "a", **kw)

    class Killed(Exception):
        pass

    def kill(step, _):
        if step == 3:  # killed during the last step, before its checkpoint
            raise Killed

    with pytest.raises(Killed):
        recover(model, pruned, masks, _data(), checkpoint_dir=tmp_path / "b", callback=kill, **kw)
    resumed, h_res = recover(model, pruned, masks, _data(), checkpoint_dir=tmp_path / "b", **kw)
    assert h_res["resumed_from"] == 2 and h_full["resumed_from"] == 0
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert h_res["loss"] == h_full["loss"]


def test_a_checkpoint_killed_before_its_commit_is_not_resumed(tiny, tmp_path, monkeypatch):
    """A run killed while orbax commits step 3's checkpoint (its files written, the rename not done)
    resumes from step 2, not from the partial step, and ends bit-identical to an uninterrupted run."""
    from orbax.checkpoint._src.path import atomicity

    _, _, model, params = tiny
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    kw = dict(FAST, steps=4, checkpoint_every=1, mode="full")
    full, h_full = recover(model, pruned, masks, _data(), checkpoint_dir=tmp_path / "a", **kw)

    class Killed(BaseException):
        pass

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed(self):
        if self.get_final().name == "step_0000003":
            raise Killed
        return await finalize(self)

    with monkeypatch.context() as m:
        m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
        with pytest.raises(Killed):
            recover(model, pruned, masks, _data(), checkpoint_dir=tmp_path / "b", **kw)
    [run] = (tmp_path / "b").iterdir()
    assert sorted(p.name for p in run.iterdir()) == [
        "step_0000001",
        "step_0000002",
        "step_0000003.orbax-checkpoint-tmp",
    ]
    resumed, h_res = recover(model, pruned, masks, _data(), checkpoint_dir=tmp_path / "b", **kw)
    assert h_res["resumed_from"] == 2
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert h_res["loss"] == h_full["loss"]
    assert sorted(p.name for p in run.iterdir()) == ["step_0000003", "step_0000004"]  # KEEP = 2, no leftover


class _NaNAtStep:
    """An optax transformation that turns the update of step `at` (0-based) into NaN."""

    def __new__(cls, at):
        def init(_):
            return jnp.zeros((), jnp.int32)

        def update(updates, count, params=None):
            bad = jax.tree.map(lambda u: jnp.where(count == at, jnp.nan, u), updates)
            return bad, count + 1

        return optax.GradientTransformation(init, update)


def test_nan_update_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    _, _, model, params = tiny
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    tx = optax.chain(optax.sgd(1e-2), _NaNAtStep(2))
    with pytest.raises(RecoveryDivergedError, match=r"step 3: .*last good checkpoint: .*step_0000002"):
        recover(
            model,
            pruned,
            masks,
            _data(),
            optimizer=tx,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            **dict(FAST, steps=5, mode="full"),
        )


def test_bad_inputs_are_refused_before_compute(tiny):
    _, _, model, params = tiny
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    with pytest.raises(RecoverySettingsError, match="steps"):
        recover(model, pruned, masks, _data(), steps=0)
    with pytest.raises(LoRARankError, match="rank=17 .*layers/self_attn/k_proj"):
        recover(model, pruned, masks, _data(), mode="lora", rank=17)
    bad = set_path(masks, "layers/mlp/up_proj/kernel", np.ones((2, 3), bool))
    with pytest.raises(MaskTreeError, match="layers/mlp/up_proj/kernel"):
        recover(model, pruned, bad, _data(), steps=1)
    with pytest.raises(MaskTreeError, match="layers/self_attn/q_proj/kernel"):
        recover(model, pruned, {"layers": {}}, _data(), steps=1)
    with pytest.raises(RecoveryDataError, match="empty"):
        recover(model, pruned, masks, {"tokens": np.zeros((0, 8), np.int32), "loss_mask": np.zeros((0, 8))})
    empty = _data()
    empty["loss_mask"][:] = 0
    with pytest.raises(RecoveryDataError, match="no loss tokens"):
        recover(model, pruned, masks, empty)
    with pytest.raises(RecoverySettingsError, match="grad_accum"):
        recover(model, pruned, masks, _data(), batch_size=4, grad_accum=3)
    with pytest.raises(RecoverySettingsError, match="recovery.data='wikitext'"):
        RecoverySettings(data="wikitext")
    with pytest.raises(ValueError, match="unknown key"):
        RecoverySettings.from_dict({"stpes": 3})


def test_memory_estimate_by_hand(tiny):
    _, _, model, params = tiny
    c = model.config
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    assert memory_bytes(c, "float32", "full") == count * 20
    r = 4
    E, F, H, K, D, L = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers
    adapters = L * r * ((E + H * D) * 2 + (E + K * D) * 2 + (E + F) * 3)
    assert memory_bytes(c, "bfloat16", "lora", rank=r) == count * 2 + 16 * adapters


def test_recover_cli_keeps_masks_and_writes_history(tmp_path, tiny_with_tokenizer, capsys, monkeypatch):
    from capjax.cli import main
    from capjax.pruning.prune import masks_from_flat

    pruned_dir, out = tmp_path / "pruned", tmp_path / "recovered"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_with_tokenizer),
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--out",
                str(pruned_dir),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "recover",
                "--model",
                str(pruned_dir),
                "--data",
                "synthetic",
                "--steps",
                "2",
                "--n",
                "8",
                "--seq-len",
                "128",
                "--batch-size",
                "2",
                "--mode",
                "full",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model, params = capjax.load_pretrained(out)
    before = capjax.load_pretrained(pruned_dir)[1]
    with np.load(out / "masks.npz") as z:
        masks = masks_from_flat(params, {p: z[p] for p in PRUNABLE})
    assert _zeros_per_matrix(params, masks) == _zeros_per_matrix(before, masks)
    assert any(np.any(np.asarray(get_path(params, p)) != np.asarray(get_path(before, p))) for p in PRUNABLE)
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 2 and history["mode"] == "full"
    capsys.readouterr()
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with monkeypatch.context() as m:  # a bad masks file is said before the model loads
        m.setattr(capjax, "load_pretrained", lambda *a, **k: pytest.fail("model loaded"))
        for bad, what in [("nope.npz", "masks file not found"), ("garbage.npz", "not a readable .npz")]:
            assert (
                main(
                    [
                        "recover",
                        "--model",
                        str(pruned_dir),
                        "--masks",
                        str(tmp_path / bad),
                        "--out",
                        str(tmp_path / "x"),
                    ]
                )
                == 2
            )
            err = capsys.readouterr().err.strip()
            assert bad in err and what in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # a subprocess with 4 fake devices and two compiles: 171 s measured on the loaded 2 cores
def test_sharded_recovery_equals_single_device(tmp_path):
    worker = Path(__file__).with_name("recovery_sharding_worker.py")
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(worker), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(worker.parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["pruned_nonzero"] == 0
    assert res["devices"] == 4, res  # the result stays sharded over the mesh
    assert res["max_diff"] < 1e-5, res


@pytest.mark.slow  # a subprocess with 8 fake devices and two compiles: 343 s measured at load ~15 on the 2 cores
def test_sharded_lora_recovery_equals_single_device(tmp_path):
    worker = Path(__file__).with_name("recovery_sharding_worker.py")
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(worker), str(out), "lora"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(worker.parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "lora" and res["devices"] == 8, res  # merged params stay sharded over all 8
    assert res["pruned_nonzero"] == 0, res
    assert res["moved"] > 1e-4, res  # the adapters changed the kept weights, so the comparison means something
    assert res["max_diff"] < 1e-5 and res["max_loss_diff"] < 1e-5, res


def test_bfloat16_params_train_in_float32_and_keep_dtype_and_zeros(tiny):
    _, _, model, params = tiny
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pruned)
    seen = []
    out, _ = recover(
        model,
        bf16,
        masks,
        _data(),
        mode="full",
        callback=lambda s, t: seen.append({str(a.dtype) for a in jax.tree.leaves(t)}),
        **FAST,
    )
    assert seen and all(d == {"float32"} for d in seen)  # float32 master weights (and AdamW state) while training
    assert {str(a.dtype) for a in jax.tree.leaves(out)} == {"bfloat16"}
    assert _zeros_per_matrix(out, masks) == _zeros_per_matrix(bf16, masks)


def test_auto_mode_picks_lora_when_full_does_not_fit(tiny, monkeypatch):
    import capjax.memory
    from capjax.recovery.train import resolve_mode

    _, _, model, params = tiny
    full = memory_bytes(model.config, "float32", "full")
    monkeypatch.setattr(capjax.memory, "available_bytes", lambda device=None: full)
    assert resolve_mode(model, params, RecoverySettings(mode="auto")) == "full"
    monkeypatch.setattr(capjax.memory, "available_bytes", lambda device=None: full - 1)
    assert resolve_mode(model, params, RecoverySettings(mode="auto")) == "lora"
    assert resolve_mode(model, params, RecoverySettings(mode="full")) == "full"
