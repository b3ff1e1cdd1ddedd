"""Perplexity (Wanda / SparseGPT protocol) and teacher-forced continuation log-likelihoods.

Legend: B batch, T time, E hidden, V vocab, C time chunk of the LM head.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.config import ModelConfig
from capjax.distributed import place_batch, to_host
from capjax.errors import NonFiniteError
from capjax.evaluate.generate import batches, bucket_length
from capjax.model import Decoder
from capjax.token_ids import check_token_ids

Params = dict[str, Any]
_CHUNK = 256  # time steps per LM-head chunk: bounds the [B, C, V] float32 logits


@functools.cache
def _token_logprobs_fn(config: ModelConfig, dtype_name: str):
    """jitted (params, tokens [B, T], mask [B, T]) -> (log p(tokens[:, t] | tokens[:, :t]) [B, T]
    float32, whether tokens[:, t] is the argmax there [B, T] bool); column 0 is (0, True).
    The LM head runs over time chunks so [B, T, V] logits are never built at once."""
    model = Decoder(config, dtype=jnp.dtype(dtype_name))

    @jax.jit
    def fn(params: Params, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        B, T = tokens.shape
        hidden, _ = model.apply({"params": params}, tokens, attention_mask=mask, method=Decoder.hidden_states)
        C = min(_CHUNK, T)
        n_chunks = -(-T // C)
        pad = n_chunks * C - T
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        # target of position t is token t + 1; the last position predicts nothing (target 0, dropped).
        targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad + 1)))
        h = h.reshape(B, n_chunks, C, -1).swapaxes(0, 1)
        targets = targets.reshape(B, n_chunks, C).swapaxes(0, 1)

        def chunk(_, xs):
            hc, tc = xs
            logits = model.apply({"params": params}, hc, method=Decoder.unembed)  # [B, C, V]
            lp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
            return None, (lp, jnp.argmax(logits, axis=-1) == tc)

        _, (lp, greedy) = jax.lax.scan(chunk, None, (h, targets))
        lp = lp.swapaxes(0, 1).reshape(B, n_chunks * C)[:, : T - 1]
        greedy = greedy.swapaxes(0, 1).reshape(B, n_chunks * C)[:, : T - 1]
        return (
            jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp], axis=1),
            jnp.concatenate([jnp.ones((B, 1), bool), greedy], axis=1),
        )

    return fn


def token_logprobs(
    model: Decoder, params: Params, tokens: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For tokens [B, T] (mask [B, T], 1 = real; right padding): (log p(token t | tokens < t)
    float32 [B, T], token t is the greedy argmax bool [B, T]); column 0 is (0, True).
    Ids outside the vocabulary, and a NaN / Inf log-probability at a real token (NaN / Inf weights,
    overflow), are errors: every metric built on these (perplexity, log-likelihoods, answer loss)
    would otherwise be computed from NaN."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones_like(tokens) if mask is None else np.asarray(mask, np.int32)
    check_token_ids(tokens, model.config.vocab_size)
    fn = _token_logprobs_fn(model.config, jnp.dtype(model.dtype).name)
    lp, greedy = to_host(fn(params, *place_batch(params, tokens, mask)))
    lp, greedy = lp[: len(tokens)], greedy[: len(tokens)]  # place_batch's masked padding rows dropped
    real = lp[mask > 0]
    if not np.all(np.isfinite(real)):
        raise NonFiniteError(
            f"log-likelihood: {int((~np.isfinite(real)).sum())} of {real.size} token "
            "log-probabilities are NaN/Inf (NaN/Inf weights, or overflow): check the checkpoint, "
            "or use dtype float32"
        )
    return lp, greedy


def perplexity(
    model: Decoder,
    params: Params,
    token_ids: np.ndarray,
    seq_len: int = 2048,
    batch_size: int = 1,
    limit_windows: int | None = None,
    progress: bool = False,
) -> dict[str, float | int | list[float]]:
    """Perplexity of a 1-D token stream, token_ids [n_stream], as Wanda and SparseGPT measure it.

    The stream is cut into non-overlapping windows of `seq_len` tokens (capped at
    `max_position_embeddings`; the remainder is dropped; at most `limit_windows`), each
    scored on its own; ppl = exp(mean NLL over all predicted tokens, T - 1 per window).
    Returns {"ppl", "nll" (mean, nats), "n_tokens" (predicted tokens), "n_windows", "seq_len",
    "window_nll" (summed NLL of each window, [n_windows], for intervals)}.
    """
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    T = min(int(seq_len), model.config.max_position_embeddings)
    n_windows = len(ids) // T
    if limit_windows is not None:
        n_windows = min(n_windows, int(limit_windows))
    if n_windows < 1 or T < 2:
        raise ValueError(
            f"no perplexity windows: {len(ids)} tokens, seq_len={T}, "
            f"limit_windows={limit_windows} (need at least one full window of >= 2 tokens)"
        )
    windows = ids[: n_windows * T].reshape(n_windows, T)
    B = max(1, min(batch_size, n_windows))
    window_nll: list[float] = []
    starts = range(0, n_windows, B)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    for start in starts:
        batch = windows[start : start + B]
        n = len(batch)
        if n < B:  # keep one compiled shape; the padding rows are dropped
            batch = np.concatenate([batch, np.repeat(batch[:1], B - n, axis=0)])
        lp, _ = token_logprobs(model, params, batch)
        window_nll += (-lp[:n, 1:].astype(np.float64).sum(axis=1)).tolist()
    n_tokens = n_windows * (T - 1)
    nll = float(np.sum(window_nll)) / n_tokens
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "seq_len": T,
        "window_nll": window_nll,
    }


def wikitext2_perplexity(
    model: Decoder,
    params: Params,
    tokenizer: Any,
    data_dir: str | os.PathLike | None = None,
    seq_len: int = 2048,
    limit_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, float | int | list[float]]:
    """`perplexity` on the WikiText-2 test text (capjax.data.load_wikitext2_text), tokenized
    once with the tokenizer's defaults (special tokens included, as Wanda does)."""
    from capjax.data import load_wikitext2_text

    text = load_wikitext2_text(data_dir)
    if limit_windows is not None:
        # ~4 characters a token; tokenizing 1.3 MB for a couple of windows is wasted time.
        text = text[: max(1, int(limit_windows)) * min(seq_len, model.config.max_position_embeddings) * 8]
    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
    return perplexity(
        model, params, ids, seq_len=seq_len, batch_size=batch_size, limit_windows=limit_windows, progress=progress
    )


def continuation_logprobs(
    model: Decoder,
    params: Params,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, int, bool]]:
    """Teacher-forced scores of continuations: for each (context ids, continuation ids),
    (sum of log p(continuation | context), number of continuation tokens, whether every
    continuation token is the greedy argmax), as lm-evaluation-harness' loglikelihood.

    Rows are right-padded to a bucketed length (`bucket_length`) and batched in input
    order; each batch compiles once per (B, bucket).
    """
    seqs = [(list(c) + list(x), len(c)) for c, x in requests]  # (sequence, context length)
    if any(len(x) == 0 for _, x in requests) or any(len(c) == 0 for c, _ in requests):
        raise ValueError("context and continuation both need at least one token")
    limit = model.config.max_position_embeddings
    B = max(1, min(batch_size, len(seqs)))
    out: list[tuple[float, int, bool]] = []
    for chunk in batches(seqs, B, "loglikelihood", progress):
        longest = max(len(s) for s, _ in chunk)
        T = bucket_length(longest)
        if longest > limit:
            raise ValueError(f"a sequence of {longest} tokens exceeds max_position_embeddings={limit}")
        tokens = np.zeros((B, T), np.int32)
        mask = np.zeros((B, T), np.int32)
        for i in range(B):
            s = chunk[i][0] if i < len(chunk) else chunk[0][0]
            tokens[i, : len(s)] = s
            mask[i, : len(s)] = 1
        lp, greedy = token_logprobs(model, params, tokens, mask)
        for i, (s, n_ctx) in enumerate(chunk):
            out.append(
                (
                    float(lp[i, n_ctx : len(s)].astype(np.float64).sum()),
                    len(s) - n_ctx,
                    bool(greedy[i, n_ctx : len(s)].all()),
                )
            )
    return out
