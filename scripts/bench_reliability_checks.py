"""What the NaN and token-id checks cost: each path with and without them, side by side in one run.

    python scripts/bench_reliability_checks.py [--batch 8] [--prompt 64] [--new 32] [--repeats 5]

On SmolLM2-135M-Instruct (float32): greedy generation with the decode loop that tracks finite logits
(`capjax.evaluate.generate.decode_fn`) against the loop without it (the code before the check,
rebuilt here), a jitted forward and an eager `model.apply` with `capjax.token_ids.check_token_ids`
against the same calls with the check replaced by a no-op. Compile excluded (one warm-up call
each); prints the best of `--repeats` seconds and the ratio checked / unchecked.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import capjax
from capjax import model as model_module
from capjax.distributed import place_batch
from capjax.evaluate.generate import decode_fn
from capjax.model import Decoder, init_cache


@functools.cache
def unchecked_decode_fn(config, dtype_name: str, max_new_tokens: int, pad_id: int):
    """The decode loop as it was before the finite-logits flag (no EOS: every step runs)."""
    model = Decoder(config, dtype=jnp.dtype(dtype_name))

    @jax.jit
    def run(params, tokens, prompt_mask):
        B, T = tokens.shape
        X = max_new_tokens
        valid = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((B, X), jnp.int32)], axis=1)
        cache = init_cache(config, B, T + X, model.dtype)
        logits, cache = model.apply({"params": params}, tokens, attention_mask=valid, cache=cache)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out = jnp.full((B, X), pad_id, jnp.int32).at[:, 0].set(first)

        def body(state):
            step, cur, cache, out = state
            logits, cache = model.apply({"params": params}, cur[:, None], attention_mask=valid, cache=cache)
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
            return step + 1, nxt, cache, out

        step, _, _, out = jax.lax.while_loop(lambda s: s[0] < X, body, (jnp.int32(1), first, cache, out))
        return out, step

    return run


def best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    c = model.config
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (a.batch, a.prompt)).astype(np.int32)
    mask = np.ones_like(tokens)
    placed = place_batch(params, tokens, mask)
    checked = decode_fn(c, "float32", a.new, (), 0)  # no EOS: both loops run every step
    plain = unchecked_decode_fn(c, "float32", a.new, 0)
    rows = [
        (
            "generate (decode loop)",
            best(lambda: checked(params, *placed)[0], a.repeats),
            best(lambda: plain(params, *placed)[0], a.repeats),
        )
    ]

    jitted = jax.jit(lambda p, t: model.apply({"params": p}, t))
    device_tokens = jnp.asarray(tokens)

    def timed_pair(call):
        with_check = best(call, a.repeats)
        real = model_module.check_token_ids
        model_module.check_token_ids = lambda *args, **kw: None
        try:
            without = best(call, a.repeats)
        finally:
            model_module.check_token_ids = real
        return with_check, without

    rows.append(("jitted forward", *timed_pair(lambda: jitted(params, device_tokens))))
    rows.append(("eager model.apply, numpy ids", *timed_pair(lambda: model.apply({"params": params}, tokens))))
    rows.append(("eager model.apply, device ids", *timed_pair(lambda: model.apply({"params": params}, device_tokens))))
    print(
        f"SmolLM2-135M float32 on {jax.devices()[0].device_kind}: B={a.batch}, prompt {a.prompt}, "
        f"{a.new} new tokens, best of {a.repeats}"
    )
    print(f"{'path':32s} {'checked s':>10s} {'unchecked s':>12s} {'ratio':>7s}")
    for name, t_checked, t_plain in rows:
        print(f"{name:32s} {t_checked:10.4f} {t_plain:12.4f} {t_checked / t_plain:7.3f}")


if __name__ == "__main__":
    main()
