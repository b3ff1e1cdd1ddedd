"""Greedy decoding with the KV cache: one prefill call, then a jitted `lax.while_loop`.

Legend: B batch, T prompt time (the bucketed, left-padded prompt length), X new tokens
(max_new_tokens), S = T + X cache slots, V vocab.

Prompts are left-padded to a bucketed length so a whole evaluation compiles once per
(B, T, X). Every row's attention mask covers all S slots from the start: the prompt's
real tokens, then ones for the X slots the decode steps will fill. Causal masking hides
slots not written yet, and positions (cumsum of the mask) come out right for each row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.config import ModelConfig
from capjax.distributed import batch_multiple, place_batch, to_host
from capjax.errors import NonFiniteError
from capjax.model import Decoder, init_cache
from capjax.token_ids import check_token_ids

Params = dict[str, Any]


def bucket_length(n: int, minimum: int = 16) -> int:
    """The padded prompt length for a longest prompt of n tokens: the next power of two
    (at least `minimum`), so prompts of similar length share one compiled program."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def batches(items: Sequence, batch_size: int, desc: str, progress: bool = False):
    """Consecutive slices of at most batch_size items, with a progress bar when asked."""
    B = max(1, min(batch_size, len(items)))
    starts = range(0, len(items), B)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        yield items[start : start + B]


@functools.cache
def decode_fn(config: ModelConfig, dtype_name: str, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int):
    """The jitted prefill + decode loop for one model architecture and decode setting.

    Keyed by hashable values (not the Module), so equal models share the compile cache;
    jax.jit adds its own cache over the (B, T) shapes.
    """
    model = Decoder(config, dtype=jnp.dtype(dtype_name))
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos[None, :], axis=-1)

    @jax.jit
    def run(params: Params, tokens: jax.Array, prompt_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens, prompt_mask [B, T] (left-padded) -> (new tokens [B, X], n_steps, finite): finite is
        whether every logit the tokens were chosen from was finite (argmax of NaN picks token 0)."""
        B, T = tokens.shape
        X = max_new_tokens
        valid = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((B, X), jnp.int32)], axis=1)
        cache: Any = init_cache(config, B, T + X, model.dtype)
        logits, cache = model.apply({"params": params}, tokens, attention_mask=valid, cache=cache)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out = jnp.full((B, X), pad_id, jnp.int32).at[:, 0].set(first)

        def cond(state):
            step, _, _, _, done, _ = state
            return (step < X) & ~jnp.all(done)

        def body(state):
            step, cur, cache, out, done, finite = state
            logits, cache = model.apply({"params": params}, cur[:, None], attention_mask=valid, cache=cache)
            finite &= jnp.all(jnp.isfinite(logits[:, -1]))
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, pad_id, nxt)
            out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
            return step + 1, nxt, cache, out, done | is_eos(nxt), finite

        state = (jnp.int32(1), first, cache, out, is_eos(first), jnp.all(jnp.isfinite(logits[:, -1])))
        step, _, _, out, _, finite = jax.lax.while_loop(cond, body, state)
        return out, step, finite

    return run


def truncate_at_stop(row: Sequence[int], eos: set[int], stop: Sequence[str] | None, tokenizer: Any) -> list[int]:
    """New tokens up to (excluding) the first EOS, then cut after the token that completes
    the first stop string, if any."""
    toks = []
    for t in row:
        if t in eos:
            break
        toks.append(int(t))
    if not stop:
        return toks
    if not any(s in tokenizer.decode(toks) for s in stop):
        return toks
    # Shortest prefix whose text holds a stop string: binary search, as a prefix's text
    # grows with the prefix (up to partial UTF-8 characters, fixed up below).
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tokenizer.decode(toks[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    while lo < len(toks) and not any(s in tokenizer.decode(toks[:lo]) for s in stop):
        lo += 1
    return toks[:lo]


def generate(
    model: Decoder,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (each a non-empty list), in input order.

    Returns per prompt the new tokens up to and excluding the first EOS (`eos_ids`, else
    `model.config.eos_ids`). With `stop` strings (needs `tokenizer`), the tokens are cut
    after the token whose decoding first completes a stop string, as transformers'
    `stop_strings` does: the stop string's text is included, so callers that want the
    text before it cut the decoded string at `text.find(stop)`. Stop strings are checked
    on the host after decoding, so they do not shorten the decode loop; EOS does.

    Batches of `batch_size` rows (the last one padded with copies of a prompt; on params
    sharded over a "data" axis, rounded up the same way to a multiple of its size) are
    left-padded to `bucket_length`, so one (B, T, X) shape compiles once. Any params with
    the model's layout work unchanged (pruned weights included).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated tokens")
    prompts = [list(map(int, p)) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts:
        return []
    config = model.config
    check_token_ids(np.fromiter((t for p in prompts for t in p), np.int64), config.vocab_size, "prompt")
    eos = tuple(int(e) for e in (config.eos_ids if eos_ids is None else eos_ids))
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    run = decode_fn(config, jnp.dtype(model.dtype).name, int(max_new_tokens), eos, int(pad_id))
    B = max(1, min(batch_size, len(prompts)))
    # Rows rounded up to place_batch's multiple with copies of a prompt, not masked rows:
    # the decode loop runs until every row is done, and a copy is done when its prompt is.
    multiple = batch_multiple(params)
    rows = -(-B // multiple) * multiple
    limit = config.max_position_embeddings

    outputs: list[list[int]] = []
    for chunk in batches(prompts, B, "generate", progress):
        T = bucket_length(max(len(p) for p in chunk))
        if max(len(p) for p in chunk) + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {max(len(p) for p in chunk)} tokens + {max_new_tokens} new tokens "
                f"exceeds max_position_embeddings={limit}"
            )
        tokens = np.full((rows, T), pad_id, np.int32)
        mask = np.zeros((rows, T), np.int32)
        for i in range(rows):
            p = chunk[i] if i < len(chunk) else chunk[0]
            tokens[i, T - len(p) :] = p
            mask[i, T - len(p) :] = 1
        out, _, finite = run(params, *place_batch(params, tokens, mask))
        out, finite = to_host(out), bool(to_host(finite))
        if not finite:
            raise NonFiniteError(
                "generation: the model's logits are NaN/Inf (NaN/Inf weights, or overflow): "
                "check the checkpoint, or use dtype float32"
            )
        outputs.extend(truncate_at_stop(out[i].tolist(), set(eos), stop, tokenizer) for i in range(len(chunk)))
    return outputs
