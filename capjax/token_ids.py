"""Token ids outside the model's vocabulary are refused where they are concrete.

An id outside [0, V) reaches the embedding gather, which JAX does not check: an id of 500 in a
60-token model reads NaN (out-of-bounds gathers fill) and -3 wraps around to V - 3, so the logits,
and every metric computed from them, are silently wrong (a tokenizer that is not the model's).

Inside jit the ids are traced and cannot be read without a host round trip, which the forward
must not pay. So the ids are checked at the Python boundary where they are still concrete, before
anything is jitted: `Decoder.embed` on concrete ids (an eager `model.apply`), and the public
entry points that jit: `generate`, `token_logprobs` (perplexity, log-likelihoods, answer loss),
the calibration batches of `score_heads` / `ablate` (`capjax.ablation.prepare_batch`) and of
`capjax.prune`, and the recovery data of `run_recovery`. Padding ids count too: a masked position's
value still enters attention (weight 0 times NaN is NaN).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class TokenIdError(ValueError):
    """A token id outside the model's vocabulary (the message names it and the fix)."""


def check_token_ids(tokens: Any, vocab_size: int, where: str = "tokens") -> None:
    """A TokenIdError naming the first id outside [0, vocab_size) and the fix; traced ids pass."""
    if isinstance(tokens, jax.core.Tracer):
        return
    if isinstance(tokens, jax.Array):
        if tokens.size == 0:
            return
        lo, hi = (int(x) for x in jax.device_get((tokens.min(), tokens.max())))
    else:
        a = np.asarray(tokens)
        if a.size == 0:
            return
        lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise TokenIdError(
            f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab_size}): the "
            "tokenizer does not belong to this model; use the model's own tokenizer"
        )
