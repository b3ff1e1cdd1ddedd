"""Sharding (8 fake CPU devices, in a subprocess), the memory-based chunk size and the OOM fallback.

The sharded checks live in tests/sharding_worker.py: XLA's host device count must be set before
JAX initialises, which this pytest process has already done. The worker runs once per session;
each check is reported as its own test here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import pytest

from capjax import memory
from capjax.config import ModelConfig
from capjax.memory import ablation_bytes, chunk_size_for_memory, is_oom, run_with_oom_fallback
from conftest import fake_devices_worker

WORKER = Path(__file__).with_name("sharding_worker.py")
CHECKS = re.findall(r"^def (check_\w+)\(", WORKER.read_text(), re.MULTILINE)


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    return fake_devices_worker(WORKER, tmp_path_factory.mktemp("sharding") / "results.json")


@pytest.mark.slow  # one 8-fake-device worker process (~80 s): in `make test-slow`, which CI runs too
@pytest.mark.parametrize("check", CHECKS)
def test_sharded(worker_results, check):
    assert check in worker_results, f"{check} did not run"
    if worker_results[check] != "ok":
        pytest.fail(worker_results[check], pytrace=False)


# ---------------------------------------------------------------------------- memory
TINY = [
    ModelConfig("llama", 101, 32, 48, 2, 4, 2, 8),
    ModelConfig("llama", 1000, 64, 176, 3, 8, 2, 8),
    ModelConfig("llama", 50, 16, 16, 1, 2, 1, 8),
]


@pytest.mark.parametrize("config", TINY)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch,seq_len", [(1, 8), (7, 12), (32, 64)])
def test_chunk_never_exceeds_budget(config, dtype, batch, seq_len):
    per = ablation_bytes(config, batch, seq_len, dtype)
    for budget in (per, 3 * per + 1, 10 * per - 1, 1 << 20, 1 << 30):
        chunk = chunk_size_for_memory(config, batch, seq_len, dtype, budget_bytes=budget)
        assert 1 <= chunk <= config.num_layers * config.num_heads
        if budget >= per:
            assert chunk * per <= budget
            assert chunk == min(config.num_layers * config.num_heads, budget // per)  # and uses it
    assert chunk_size_for_memory(config, batch, seq_len, dtype, budget_bytes=per - 1) == 1  # never below 1


def test_ablation_bytes_formula():
    c = ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128)  # Llama-3-8B shapes
    B, T = 128, 256
    layer = B * T * (2 * (4 * 4096 + 2 * 40 * 128 + 3 * 14336) + 10 * 32 * T)
    assert ablation_bytes(c, B, T, jnp.bfloat16, answer_tokens=0) == layer
    assert ablation_bytes(c, B, T, jnp.bfloat16, answer_tokens=B * T // 4) == B * T // 4 * 128256 * 8
    # the fast paths hold one 4096-column vocabulary chunk of logits: the layer term dominates again
    assert ablation_bytes(c, B, T, jnp.bfloat16, answer_tokens=0, vocab_chunk=4096) == layer
    assert ablation_bytes(c, B, T, jnp.bfloat16, answer_tokens=B * T // 4, vocab_chunk=10**6) == B * T // 4 * 128256 * 8
    assert ablation_bytes(c, B, T, jnp.bfloat16, answer_tokens=B * T // 4, vocab_chunk=4096) == layer
    # 16 GB of bf16 params on a 141 GB accelerator leave room for several ablations at once
    params = 2 * c.num_params()
    assert chunk_size_for_memory(c, B, T, jnp.bfloat16, 0.75 * (141e9 - params), B * T // 4) >= 4
    assert chunk_size_for_memory(c, B, T, jnp.bfloat16, 0.75 * (80e9 - params), B * T // 4) >= 2
    assert chunk_size_for_memory(c, B, T, jnp.bfloat16, 0.75 * (141e9 - params), B * T // 4, vocab_chunk=4096) == 12


@pytest.mark.parametrize(
    "vocab,seq_len,answer_from",
    [
        (20000, 32, 16),  # LM head term dominates
        (300, 128, 100),
    ],
)  # layer term dominates
def test_formula_bounds_compiled_scoring_memory(vocab, seq_len, answer_from):
    """XLA's own buffer assignment for the fast scoring path (float32, CPU) is the oracle: its
    temporary bytes stay within chunk * ablation_bytes (+10% and a small fixed part), and each
    extra ablation costs at least half of what the formula says (it is not a loose bound)."""
    import jax
    import numpy as np

    from capjax import attribution
    from capjax.ablation import prepare_batch
    from capjax.model import VOCAB_CHUNK, Decoder

    c = ModelConfig("llama", vocab, 64, 176, 3, 8, 2, 8)
    model = Decoder(c)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tokens = np.random.default_rng(0).integers(0, vocab, (4, seq_len))
    loss_mask = np.zeros(tokens.shape, np.int32)
    loss_mask[:, answer_from:] = 1
    prep = prepare_batch(model, tokens, loss_mask, None)
    per = ablation_bytes(c, *prep.packed.tokens.shape, jnp.float32, prep.packed_ans[0].shape[0], VOCAB_CHUNK)
    masks = jnp.ones((4, c.num_layers, c.num_heads))

    def temp_bytes(chunk):
        lowered = attribution.masked_nll.lower(
            model, params, prep.rows, prep.packed_ans, prep.packed.num_examples, masks, chunk
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    temp = {chunk: temp_bytes(chunk) for chunk in (1, 4)}
    for chunk, used in temp.items():
        assert used <= 1.1 * chunk * per + (256 << 10), (chunk, used, per)
    assert temp[4] - temp[1] >= 0.5 * 3 * per, (temp, per)


def test_default_budget_is_positive():
    assert chunk_size_for_memory(TINY[0], 4, 16) >= 1  # CPU: memory_stats() is None -> psutil / default


def test_cpu_default_chunk_stays_near_the_cache():
    smollm2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64)
    per = ablation_bytes(smollm2, 6, 96, vocab_chunk=4096)  # ~24 MiB, the plain GSM8K benchmark
    assert 8 << 20 < per < memory.CPU_CHUNK_BYTES
    assert chunk_size_for_memory(smollm2, 6, 96, vocab_chunk=4096) == memory.CPU_CHUNK_BYTES // per
    assert chunk_size_for_memory(smollm2, 6, 96, budget_bytes=1 << 30, vocab_chunk=4096) == (1 << 30) // per


class FakeOOM(RuntimeError):
    pass


def test_oom_fallback_halves_until_it_fits():
    calls = []

    def fn(chunk):
        calls.append(chunk)
        if chunk > 3:
            raise FakeOOM(f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {chunk << 30} bytes.")
        return chunk * 10

    with pytest.warns(RuntimeWarning) as record:
        assert run_with_oom_fallback(fn, 16) == 20
    assert calls == [16, 8, 4, 2]
    assert [str(w.message) for w in record] == [
        "out of memory at chunk=16; retrying with 8",
        "out of memory at chunk=8; retrying with 4",
        "out of memory at chunk=4; retrying with 2",
    ]


def test_oom_fallback_gives_up_at_one_and_passes_other_errors():
    def always(chunk):
        raise FakeOOM("Out of memory")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FakeOOM):
            run_with_oom_fallback(always, 4)

    calls = []

    def other(chunk):
        calls.append(chunk)
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError):
        run_with_oom_fallback(other, 8)
    assert calls == [8]
    assert is_oom(MemoryError()) and not is_oom(ValueError("x"))


def test_oom_fallback_in_attribution(monkeypatch):
    """score_heads retries a layer group with a smaller chunk and keeps it for the next groups."""
    import numpy as np

    from capjax import attribution
    from capjax.model import Decoder, init_params

    config = TINY[0]
    model, params = Decoder(config), init_params(config)
    tokens = np.random.default_rng(0).integers(0, 101, (3, 8)).astype(np.int32)
    loss_mask = np.zeros((3, 8), np.float32)
    loss_mask[:, 4:] = 1
    ref = attribution.score_heads(model, params, tokens, loss_mask, progress=False, chunk_size=4)
    real = attribution._single_head_nll
    chunks = []

    def ooms_above_one(*args, **kwargs):
        chunks.append(args[7])
        if args[7] > 1:
            raise FakeOOM("RESOURCE_EXHAUSTED: Out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "_single_head_nll", ooms_above_one)
    with pytest.warns(RuntimeWarning, match="out of memory at chunk=4; retrying with 2"):
        got = attribution.score_heads(model, params, tokens, loss_mask, progress=False, chunk_size=4, layers_per_call=1)
    assert chunks == [4, 2, 1, 1]  # layer group 1 starts at the reduced chunk
    np.testing.assert_allclose(got.masked, ref.masked, atol=1e-6)


@pytest.mark.slow  # ~30-60 s: the accelerator benchmark's code path on a tiny config, 8 fake devices
def test_bench_device_small_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    script = WORKER.parents[1] / "scripts" / "bench_device.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--small", "--mesh", "data=4,model=2", "--batch", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=WORKER.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ("all heads, score_heads", "extrapolated by FLOPs", "prune wanda 2:4", "prune cap 2:4"):
        assert text in proc.stdout, proc.stdout
