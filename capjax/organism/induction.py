"""The induction organism: planted circuits as ground truth for head scores.

Legend: B rows, T time, S key time (= T), L layers, H query heads, K kv heads, G = H // K,
D head dim, E hidden, V vocab, J segment length (the repeated random tokens).

Training rows are <s>, a random filler, a segment of random tokens, then the same segment again;
filler and segment lengths vary, so predicting the repeat needs content matching, not a fixed
offset: the model forms induction heads (attend to the token after the previous occurrence of the
current token) fed by previous-token heads (Olsson et al. 2022). Both are identified from the
attention probabilities alone, with no ablation, on <s> A A sequences (A: J random tokens):

    prefix-matching score [L, H]  mean attention from a second-copy position t to t - J + 1
    previous-token score  [L, H]  mean attention from every position t >= 1 to t - 1

The circuit is the heads whose prefix-matching score exceeds a threshold (induction heads) and the
heads below the last induction layer whose previous-token score does (previous-token heads). Head
scores are then judged by precision@k against it, and pair / group ablations show what
single-head ablation cannot see when heads are redundant.

`attention_probs` reads the post-softmax attention of every layer (the attn.pattern site, captured
on `capjax.scan.scan_layers`); tests check it against transformers' `output_attentions=True`.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.model import Decoder, layer_context
from capjax.scan import scan_layers
from capjax.sites import Interventions

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
FIRST = len(SPECIAL)  # id of token "t0"


def induction_tokenizer(vocab_size: int):
    """A word-level PreTrainedTokenizerFast over <pad> <unk> <s> </s> t0 .. t{V-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIAL) + [f"t{i}" for i in range(vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


def induction_examples(n: int, segment_len: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """n training rows [B, T = 1 + 3 J]: <s>, filler of 0 .. J random tokens, a segment of
    J // 2 .. J random tokens, the segment again, right padding; the repeat's predictable tokens
    (all but its first) in the loss."""
    rng = np.random.default_rng([seed, 11])
    T = 1 + 3 * segment_len
    tokens = np.zeros((n, T), np.int32)  # <pad> = 0
    loss_mask = np.zeros((n, T), np.float32)
    am = np.zeros((n, T), np.int32)
    for i in range(n):
        f = int(rng.integers(0, segment_len + 1))
        p = int(rng.integers(segment_len // 2, segment_len + 1))
        seg = FIRST + rng.integers(0, vocab_size, p)
        row = np.concatenate([[SPECIAL.index("<s>")], FIRST + rng.integers(0, vocab_size, f), seg, seg])
        tokens[i, : len(row)], am[i, : len(row)] = row, 1
        loss_mask[i, 1 + f + p + 1 : len(row)] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": am}


def repeat_batch(n: int, segment_len: int, vocab_size: int, seed: int = 1) -> dict[str, np.ndarray]:
    """n rows <s> A A [B, T = 1 + 2 J] (A: J random tokens), the second copy's tokens after its
    first in the loss: the prefix-matching probe and the induction calibration task."""
    rng = np.random.default_rng([seed, 13])
    seg = FIRST + rng.integers(0, vocab_size, (n, segment_len))
    tokens = np.concatenate([np.full((n, 1), SPECIAL.index("<s>")), seg, seg], axis=1).astype(np.int32)
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, segment_len + 2 :] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": np.ones(tokens.shape, np.int32)}


# ---------------------------------------------------------------------------- attention
def attention_probs(model: Decoder, params, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Post-softmax attention probabilities [L, B, H, T, S] of tokens [B, T]: the attn.pattern site
    (`capjax.sites`) of every layer, captured on the one layer scan."""
    return np.asarray(
        _attention_probs(
            model, params, jnp.asarray(tokens), None if attention_mask is None else jnp.asarray(attention_mask)
        )
    )


@partial(jax.jit, static_argnames=("model",))
def _attention_probs(model: Decoder, params, tokens, attention_mask):
    x, ctx = layer_context(model, params, tokens, attention_mask)
    iv = Interventions(capture=frozenset({"attn.pattern"}))
    return scan_layers(model, params, x, ctx, iv=iv, collect="sites")[1]["attn.pattern"]


def prefix_matching_scores(probs: np.ndarray, segment_len: int) -> np.ndarray:
    """[L, H]: mean attention of each second-copy query t (1 + J .. 2 J, on <s> A A rows) to
    t - J + 1, the token after the previous occurrence of the current token. probs [L, B, H, T, S]."""
    J = segment_len
    t = np.arange(1 + J, 1 + 2 * J)
    return probs[:, :, :, t, t - J + 1].mean(axis=(1, 3))


def previous_token_scores(probs: np.ndarray) -> np.ndarray:
    """[L, H]: mean attention of every query t >= 1 to t - 1. probs [L, B, H, T, S]."""
    t = np.arange(1, probs.shape[3])
    return probs[:, :, :, t, t - 1].mean(axis=(1, 3))


def circuit(prefix: np.ndarray, previous: np.ndarray, threshold: float = 0.3) -> dict[str, list[tuple[int, ...]]]:
    """The planted circuit from the two attention scores [L, H]: induction heads (prefix-matching
    > threshold) and previous-token heads (previous-token score > threshold, in a layer below the
    last induction head's). Heads as (layer, head)."""
    induction = [tuple(map(int, i)) for i in zip(*np.nonzero(prefix > threshold))]
    top = max((l for l, _ in induction), default=-1)
    prev = [
        tuple(map(int, i))
        for i in zip(*np.nonzero(previous > threshold))
        if i[0] < top and tuple(map(int, i)) not in induction
    ]
    return {"induction": induction, "previous": prev, "all": sorted(induction + prev)}


def precision_at_k(scores: np.ndarray, heads: list[tuple[int, int]], k: int | None = None) -> float:
    """Fraction of the k highest-scoring heads (scores [L, H]) that are in `heads` (k: len(heads))."""
    k = len(heads) if k is None else k
    if k < 1:
        raise ValueError("precision@k needs k >= 1 (an empty circuit has no precision)")
    H = scores.shape[1]
    order = np.argsort(-scores.reshape(-1), kind="stable")[:k]
    return float(np.mean([(int(i) // H, int(i) % H) in set(heads) for i in order]))


def group_ablations(
    model: Decoder, params, batch: dict[str, np.ndarray], groups: dict[str, list[tuple[int, int]]]
) -> dict[str, float]:
    """Loss increase over the intact loss when each group of heads is zero-ablated together
    (`capjax.head_ablation_losses`), on batch (tokens, loss_mask [B, T])."""
    from capjax.attribution import head_ablation_losses

    c = model.config
    names = list(groups)
    masks = np.ones((1 + len(names), c.num_layers, c.num_heads), np.float32)  # [1 + groups, L, H]
    for i, name in enumerate(names):
        for layer, head in groups[name]:
            masks[1 + i, layer, head] = 0.0
    losses = head_ablation_losses(
        model, params, batch["tokens"], batch["loss_mask"], masks, attention_mask=batch.get("attention_mask")
    )
    return {"intact": float(losses[0]), **{n: float(losses[1 + i] - losses[0]) for i, n in enumerate(names)}}


def redundancy(model: Decoder, params, batch, heads: list[tuple[int, int]]) -> dict[str, Any]:
    """Single, pair and whole-group ablations of `heads`: {"single": {head: delta}, "pairs":
    {(a, b): delta}, "group": delta, "sum_single": sum of single deltas}."""
    groups = {str(h): [h] for h in heads}
    groups.update({f"{a}+{b}": [a, b] for a, b in itertools.combinations(heads, 2)})
    groups["group"] = list(heads)
    d = group_ablations(model, params, batch, groups)
    single = {str(h): d[str(h)] for h in heads}
    pairs = {f"{a}+{b}": d[f"{a}+{b}"] for a, b in itertools.combinations(heads, 2)}
    return {
        "intact": d["intact"],
        "single": single,
        "pairs": pairs,
        "group": d["group"],
        "sum_single": float(sum(single.values())),
    }


def repeat_accuracy(
    model: Decoder, params, segment_len: int, vocab_size: int, n: int = 500, seed: int = 2
) -> dict[str, Any]:
    """Teacher-forced greedy accuracy on the predictable second-copy tokens of n held-out <s> A A
    rows (a seed the training rows do not use), and the same on the first copy (chance level)."""
    from capjax.evaluate.perplexity import token_logprobs

    b = repeat_batch(n, segment_len, vocab_size, seed=seed + 1000)
    _, greedy = token_logprobs(model, params, b["tokens"])  # [B, T] bool
    J = segment_len
    return {
        "repeat_accuracy": float(greedy[:, J + 2 :].mean()),
        "first_copy_accuracy": float(greedy[:, 2 : J + 1].mean()),
        "n": n,
    }


# ---------------------------------------------------------------------------- activation patching
def corrupt_first_copy(
    batch: dict[str, np.ndarray], segment_len: int, vocab_size: int, seed: int = 5
) -> dict[str, np.ndarray]:
    """The <s> A A rows of `batch` (repeat_batch) as <s> A' A: the first copy resampled (A' : J new
    random tokens), the second kept, so the second copy no longer repeats anything."""
    rng = np.random.default_rng([seed, 17])
    tokens = np.array(batch["tokens"])  # [B, T]
    J = segment_len
    tokens[:, 1 : 1 + J] = FIRST + rng.integers(0, vocab_size, (tokens.shape[0], J))
    return {**batch, "tokens": tokens.astype(np.int32)}


def repeat_loss_metric(batch: dict[str, np.ndarray]):
    """A patching metric (logits [B, T, V] -> scalar): the mean next-token loss of the clean
    tokens of `batch` at its loss_mask positions (the second copy after its first token)."""
    tokens = jnp.asarray(batch["tokens"])  # [B, T]
    weight = jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:]  # [B, T - 1] targets in the loss

    def metric(logits):
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T - 1, V]
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T - 1]
        return jnp.sum(nll * weight) / jnp.sum(weight)

    return metric


def patching_scores(
    model: Decoder, params, batch: dict[str, np.ndarray], segment_len: int, vocab_size: int, seed: int = 5
) -> dict[str, Any]:
    """Activation patching of every head (attn.z, all positions at once; `capjax.patching.patch`)
    between clean <s> A A rows (batch) and corrupted <s> A' A rows, metric the repeat's loss on the
    clean tokens. noising [L, H]: loss increase when the head's output on the clean rows is taken
    from the corrupted run; denoising [L, H]: loss decrease when the corrupted run gets the head's
    clean output. Both are head scores (higher = more of the circuit's work)."""
    from capjax.patching import patch

    corrupted = corrupt_first_copy(batch, segment_len, vocab_size, seed)
    metric = repeat_loss_metric(batch)
    mask = batch.get("attention_mask")
    noise = patch(
        model, params, batch["tokens"], corrupted["tokens"], "attn.z", metric, direction="noising", attention_mask=mask
    )
    denoise = patch(
        model,
        params,
        batch["tokens"],
        corrupted["tokens"],
        "attn.z",
        metric,
        direction="denoising",
        attention_mask=mask,
    )
    return {
        "clean_loss": noise.clean,
        "corrupted_loss": noise.corrupted,
        "noising": noise.values - noise.clean,
        "denoising": denoise.corrupted - denoise.values,
    }
