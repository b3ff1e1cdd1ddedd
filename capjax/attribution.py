"""CAP head attribution: the loss increase when one attention head is ablated.

Legend: N mask vectors, B calibration examples, T time, A answer tokens in the batch,
L layers, H query heads, U calibration subsets (K is kept for kv heads), E hidden, V vocab.

Loss: token-level cross-entropy = total NLL of the answer tokens / their count. `loss_mask[b, t]`
marks token t as an answer token; it is predicted from position t - 1.

The kernels are `capjax.ablation`'s (one layer scan, `capjax.scan`; interventions as
`capjax.sites.Interventions`); this module keeps what is CAP's: `HeadScores` and `score_heads`'
orchestration (subsets, layer groups, checkpoints, progress). Two exact paths, equal to 1e-5 in
float32 (tests prove it):
- `head_ablation_losses`: any batch of masks [N, L, H], one jitted `vmap` over masks in chunks.
- `score_heads(method="ablation")`: every single-head ablation, with prefix reuse (the layers
  below the ablated layer are computed once and shared by its H ablations), the last layer and
  the logits only at answer positions, and the calibration examples packed into rows
  (`capjax.packing`: little padding, nothing after an example's last answer token, and the tokens
  every example starts with, such as a chat template's system prompt, computed once). One compiled
  call scans over layers; with `checkpoint_dir`, the same compiled function runs a few layers
  per call and saves each finished group with orbax, so a killed run resumes where it stopped.

With `mesh` (see `capjax.sharding`), params are sharded by `sharding.DEFAULT_RULES` and each
step's batch of masks is split over the "data" axis: d devices evaluate d times as many
ablations per step; `chunk_size` is then per device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax import estimators, sharding
from capjax.ablation.batch import (  # noqa: F401
    AnswerPositions,
    PreparedBatch,
    answer_arrays,
    answer_positions,
    check_calibration,
    prepare_batch,
)
from capjax.ablation.core import gradient_deltas, intact_log_probs, intact_values, values_batch
from capjax.ablation.kinds import check_kind, replacements
from capjax.ablation.metrics import CE, Metric, get_metric
from capjax.ablation.progress import showing, tick
from capjax.ablation.single import single_unit_values
from capjax.artifacts import Digest, read_scores_npz, scores_settings, write_scores_npz
from capjax.distributed import checksum, to_host
from capjax.errors import NonFiniteError
from capjax.memory import chunk_size_for_memory, run_with_oom_fallback
from capjax.model import VOCAB_CHUNK, Decoder
from capjax.stats import MIN_RESAMPLES, head_interval

Array = jax.Array
AGGREGATES = estimators.SUBSET_AGGREGATES
METHODS = estimators.SCORING_METHODS


@dataclasses.dataclass(frozen=True)
class HeadScores:
    """delta [L, H]: estimated loss increase when the head is ablated (higher = more important).
    masked [U, L, H]: loss with that head ablated, per subset. baseline [U]: intact loss per subset.

    Exact ablation also keeps what the estimators are computed from, per calibration example:
    example_masked [L, H, B] (the metric summed over the example's answer tokens, head ablated;
    the answer NLL for ce), example_baseline [B] (the same, intact) and answer_count [B]. interval
    [2, L, H] is a bootstrap interval of each head's loss increase over examples (see
    `capjax.stats.head_interval`), when asked for. kind and metric say what was measured: the
    ablation kind (`capjax.ablation.kinds`) and the metric's name (`capjax.ablation.metrics`);
    zero / ce is CAP's score."""

    delta: np.ndarray
    masked: np.ndarray
    baseline: np.ndarray
    aggregate: str = "median"
    method: str = "ablation"
    example_masked: np.ndarray | None = None
    example_baseline: np.ndarray | None = None
    answer_count: np.ndarray | None = None
    interval: np.ndarray | None = None
    kind: str = "zero"
    metric: str = "ce"

    OPTIONAL = ("example_masked", "example_baseline", "answer_count", "interval")

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, by field name (the optional ones only where present)."""
        out = {"delta": self.delta, "masked": self.masked, "baseline": self.baseline}
        out.update({k: getattr(self, k) for k in self.OPTIONAL if getattr(self, k) is not None})
        return out

    def save(self, path: str | Path, **settings: Any) -> Path:
        """Writes an .npz (".npz" appended when missing, as numpy does); returns the real path."""
        return write_scores_npz(path, self.arrays(), {**self.settings(), **settings})

    def settings(self) -> dict[str, str]:
        """What the arrays mean: aggregate, method, kind and metric (saved beside them)."""
        return {"aggregate": self.aggregate, "method": self.method, "kind": self.kind, "metric": self.metric}

    def describe(self) -> str:
        """e.g. "median, zero ablation, ce" (for titles and logs)."""
        return f"{self.aggregate}, {self.kind} ablation, {self.metric}"

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> HeadScores:
        """From `save`'s file ("settings") or a results folder's artifact ("meta"); files written
        before kind and metric were recorded are zero / ce, the only scores capjax made then."""
        settings = scores_settings(arrays)
        return cls(
            arrays["delta"],
            arrays["masked"],
            arrays["baseline"],
            settings.get("aggregate", "median"),
            settings.get("method", "ablation"),
            **{k: arrays.get(k) for k in cls.OPTIONAL},
            kind=settings.get("kind", "zero"),
            metric=settings.get("metric", "ce"),
        )

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        """Reads a scores .npz; an unreadable file is an ArtifactError naming it."""
        return cls.from_arrays(read_scores_npz(path))

    def with_aggregate(self, aggregate: str) -> HeadScores:
        """The same losses aggregated another way, with no forward pass: any registered estimator
        (`capjax.estimators`) from the per-example losses, or median / mean / paired from the
        per-subset ones when only those exist (gradient scores)."""
        if self.example_masked is None:
            return dataclasses.replace(
                self, delta=aggregate_scores(self.masked, self.baseline, aggregate), aggregate=aggregate
            )
        L, H, B = self.example_masked.shape
        assert self.example_baseline is not None and self.answer_count is not None  # kept with example_masked
        delta = estimators.estimate(
            aggregate,
            self.example_masked.reshape(L * H, B),
            self.example_baseline,
            self.answer_count,
            self.masked.shape[0],
        )
        return dataclasses.replace(self, delta=np.asarray(delta).reshape(L, H), aggregate=aggregate)

    def with_interval(self, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> HeadScores:
        """A bootstrap interval [2, L, H] over calibration examples (exact ablation only); none
        (interval None: no test) below `capjax.stats.MIN_RESAMPLES` resamples."""
        if resamples < MIN_RESAMPLES:
            return dataclasses.replace(self, interval=None)
        if self.example_masked is None:
            raise ValueError(
                f"no per-example losses to bootstrap (method={self.method!r}; intervals need method='ablation')"
            )
        assert self.example_baseline is not None and self.answer_count is not None  # kept with example_masked
        return dataclasses.replace(
            self,
            interval=head_interval(
                self.example_masked, self.example_baseline, self.answer_count, resamples, seed, level
            ),
        )


def aggregate_scores(masked: np.ndarray, baseline: np.ndarray, aggregate: str = "median") -> np.ndarray:
    """delta [L, H] from masked [U, L, H] and baseline [U]: `capjax.estimators.from_subsets`.

    median: median_k masked[k] - mean_k baseline[k] (the paper); mean: mean_k masked - mean_k baseline;
    paired: median_k (masked[k] - baseline[k]), which cancels between-subset difficulty.
    """
    return estimators.from_subsets(aggregate, masked, baseline)


def _full_logits_nll(model: Decoder, params, tokens, attention_mask, head_mask, ans) -> Array:
    """The obvious path: full logits [B, T, V], then the same per-example NLL sums [B]."""
    logits: Any = model.apply({"params": params}, tokens, head_mask=head_mask, attention_mask=attention_mask)
    B, T, V = logits.shape
    flat_pos, target, example = ans
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(B * T, V)[flat_pos]
    nll = -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
    return jax.ops.segment_sum(nll, example, num_segments=B)


# ---------------------------------------------------------------------------- chunk size
def default_chunk_size(
    config,
    batch: int,
    seq_len: int,
    dtype: Any = jnp.float32,
    budget_bytes: float | None = None,
    answer_tokens: int | None = None,
    vocab_chunk: int | None = VOCAB_CHUNK,
) -> int:
    """Ablations evaluated at once (per device) so that their activations fit in the free device
    memory, or `budget_bytes`: `capjax.memory.chunk_size_for_memory` (formula there). The default
    `vocab_chunk` is the fast paths' (`token_nll`); None counts full [A, V] logits. Callers
    run it under `run_with_oom_fallback`, which halves it after an out-of-memory error."""
    return chunk_size_for_memory(config, batch, seq_len, dtype, budget_bytes, answer_tokens, vocab_chunk=vocab_chunk)


def _map_masks(one, masks, chunk_size, mesh):
    if mesh is not None:
        return sharding.sharded_map(one, masks, chunk_size, mesh)
    return jax.lax.map(one, masks, batch_size=chunk_size)


@partial(jax.jit, static_argnames=("model", "num_examples", "chunk_size", "mesh"))
def masked_nll(model, params, rows, ans, num_examples, masks, chunk_size, mesh=None):
    """Per-example NLL sums [N, B] under each of masks [N, L, H] on packed rows:
    `capjax.ablation.values_batch` of head masks (zero ablation, answer cross-entropy)."""
    return values_batch(model, params, rows, ans, num_examples, CE, None, {}, {"heads": masks}, chunk_size, mesh=mesh)


@partial(jax.jit, static_argnames=("model", "chunk_size", "mesh"))
def _naive_masked_nll(model, params, tokens, attention_mask, ans, masks, chunk_size, mesh=None):
    """The same from full [B, T, V] logits of the unpacked batch: the reference for the fast path."""
    return _map_masks(
        lambda m: _full_logits_nll(model, params, tokens, attention_mask, m, ans), masks, chunk_size, mesh
    )


# The prepared calibration batch is public in capjax.ablation.batch; these names keep old callers working.
_Prepared = PreparedBatch
_prepare = prepare_batch
_check_calibration = check_calibration
_ans_arrays = answer_arrays


def head_ablation_losses(
    model: Decoder,
    params,
    tokens,
    loss_mask,
    masks,
    attention_mask=None,
    chunk_size: int | None = None,
    answer_only: bool = True,
    mesh=None,
    per_example: bool = False,
) -> np.ndarray:
    """Loss [N] of the calibration batch (tokens, loss_mask, attention_mask [B, T], as in `score_heads`)
    under each head mask in `masks` [N, L, H]; with
    `per_example`, the summed answer-token NLL of each example instead, [N, B] (divide by
    `prepare_batch(...).count` for per-example means). Any ablation kind / component / metric:
    `capjax.ablation.ablate`.

    One jitted function: `vmap` over masks, `lax.map` over chunks of `chunk_size` masks (default
    from `default_chunk_size`, halved on out-of-memory errors), logits only at answer positions
    (and the last layer too) on the examples packed into rows (`capjax.packing`); answer_only=False
    computes full logits on the padded batch instead (the slow reference). With `mesh`, params
    are sharded by the default rules and the masks (padded to a multiple of the "data" axis) are
    split over "data".
    """
    c = model.config
    masks = jnp.asarray(masks, model.dtype)
    if masks.ndim != 3 or masks.shape[1:] != (c.num_layers, c.num_heads):
        raise ValueError(f"masks must be [N, L, H] = [N, {c.num_layers}, {c.num_heads}], got {tuple(masks.shape)}")
    prep = _prepare(model, tokens, loss_mask, attention_mask)
    ans = prep.ans
    rows, cols = prep.shape if answer_only else prep.tokens.shape
    chunk = chunk_size or (
        default_chunk_size(c, rows, cols, model.dtype, answer_tokens=len(ans.target))
        if answer_only
        else default_chunk_size(c, rows, cols, model.dtype, vocab_chunk=None)
    )
    n = masks.shape[0]
    if mesh is not None:
        params = sharding.shard_params(params, mesh)
        masks, _ = sharding.pad_to_multiple(masks, sharding.axis_size(mesh, sharding.DATA))
        masks = jax.device_put(masks, sharding.batch_sharding(mesh, masks.shape))
    if answer_only:

        def run(ch):
            return to_host(
                masked_nll(model, params, prep.rows, prep.packed_ans, prep.packed.num_examples, masks, ch, mesh=mesh)
            )
    else:

        def run(ch):
            return to_host(
                _naive_masked_nll(
                    model, params, prep.tokens, prep.attention_mask, _ans_arrays(ans), masks, ch, mesh=mesh
                )
            )

    nll = run_with_oom_fallback(run, chunk)
    if per_example:
        _check_finite(nll[:n], "head_ablation_losses")
        return nll[:n].astype(np.float64)
    losses = nll[:n].sum(axis=1) / ans.count.sum()
    _check_finite(losses, "head_ablation_losses")
    return losses


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise NonFiniteError(
            f"{what}: non-finite loss ({int((~np.isfinite(x)).sum())} of {x.size} values are NaN/inf). "
            "Check the params (NaN weights?), use float32 instead of bfloat16, or shorten seq_len."
        )


# ---------------------------------------------------------------------------- prefix reuse
@partial(jax.jit, static_argnames=("model", "num_examples", "num_layers", "chunk_size", "progress", "mesh", "metric"))
def single_head_nll(
    model,
    params,
    packed,
    ans,
    num_examples,
    start,
    num_layers,
    chunk_size,
    progress=False,
    mesh=None,
    metric: Metric = CE,
    ref=None,
    reps: dict | None = None,
):
    """Per-example NLL sums [num_layers, H, B] for ablating each head of layers start..start+num_layers-1:
    `capjax.ablation.single_unit_values` (the layer scan whose H ablations share each layer's intact
    hidden state; last layer only at the answer positions), zero ablation and answer cross-entropy
    unless `metric` / `ref` / `reps` say otherwise.

    packed: (tokens, segment_ids, positions) [P, S] and the shared prefix's tokens [Pf] from
    `capjax.packing.pack_examples`; ans: the answer positions in that layout, for B = num_examples
    examples. With `mesh`, the H ablations of each layer are split over "data".
    """
    reps = {"heads": None} if reps is None else reps
    return single_unit_values(
        model,
        params,
        packed,
        ans,
        num_examples,
        metric,
        ref,
        reps,
        start,
        num_layers,
        chunk_size,
        mesh=mesh,
        on_layer=tick if progress else None,
    )


_single_head_nll = single_head_nll  # score_heads calls it by this name (tests wrap it to count calls)


@partial(jax.jit, static_argnames=("model", "num_examples"))
def intact_nll(model, params, rows, ans, num_examples):
    """Intact per-example NLL sums [B] on packed rows (`PreparedBatch.rows`, `.packed_ans`)."""
    return intact_values(model, params, rows, ans, num_examples, CE)


def _fingerprint(model, params, tokens, loss_mask, attention_mask, extra) -> str:
    d = Digest().text(repr((model.config, str(model.dtype), extra)))
    for a in (tokens, loss_mask, attention_mask):
        d.array(a, layout=False)
    for leaf in jax.tree.leaves(params):  # cheap: a checksum per leaf, not the bytes; layout-independent
        d.raw(checksum(leaf).tobytes())
    return d.hex(16)


def check_method_metric(method: str, metric: str) -> None:
    """Gradient scores are first order: d metric / d head mask at the intact model. The KL from the
    intact model is zero there with zero gradient, so gradient x kl scores are float noise (about
    1e-11) that CAP's min-max scaling would stretch over importance 1-10: refused by name."""
    if method == "gradient" and metric == "kl":
        raise ValueError(
            "method=gradient with metric=kl measures float noise (the KL from the intact model has "
            "zero gradient at the intact model): use method=ablation with metric=kl, or metric=ce"
        )


def score_heads(
    model: Decoder,
    params,
    tokens,
    loss_mask,
    subsets: int = 3,
    aggregate: str = "median",
    method: str = "ablation",
    attention_mask=None,
    chunk_size: int | None = None,
    checkpoint_dir: str | Path | None = None,
    layers_per_call: int | None = None,
    progress: bool = True,
    mesh=None,
    pack: bool = True,
    share_prefix: bool = True,
    bootstrap: int = 0,
    kind: str = "zero",
    metric: str | Metric | Callable = "ce",
    resume: bool = True,
) -> HeadScores:
    """Scores every head: HeadScores(delta [L, H], masked [U, L, H], baseline [U]).

    tokens, loss_mask, attention_mask [B, T]: the calibration batch (`capjax.CalibrationBatch`);
    loss_mask marks the answer tokens whose loss is measured.
    Subsets are the U contiguous near-equal splits of the batch (numpy.array_split), each with its
    own token-level loss; `aggregate` names a registered estimator (`capjax.estimators`: median,
    mean, paired, bootstrap, or your own), computed from the per-example losses [L * H, B]
    (method="gradient": median, mean or paired). method="ablation" is exact (prefix reuse, answer-only logits);
    method="gradient" is the first-order estimate masked[k] = baseline[k] - dL_k/dmask (Michel et
    al. 2019), one backward pass. With `checkpoint_dir`, finished layer groups are saved (orbax) and
    a rerun with the same arguments and the same capjax code resumes from them (each group is
    stamped with `capjax.provenance.code_version`; resume=False recomputes and overwrites every
    group). With `mesh`, params are sharded by
    `capjax.sharding.DEFAULT_RULES` and each layer's H single-head ablations are split over
    the mesh's "data" axis (`chunk_size` per device). With `pack` (default), the ablations run on
    the examples packed into rows (`capjax.packing`); pack=False keeps one example per row. With
    `share_prefix` (and `pack`), the tokens all examples start with (a chat template's system
    prompt) run once per ablation, not once per example (`capjax.packing`). With `bootstrap`
    resamples (exact ablation only), `interval` [2, L, H] holds each head's 95% bootstrap
    interval over calibration examples, from the per-example losses the pass already has.
    `kind` (zero | mean | resample, `capjax.ablation.kinds`) replaces the ablated head's output and
    `metric` ("ce", "kl" or a `capjax.ablation` metric) is what is measured at the answer tokens
    ("loss" above); the default zero / ce is CAP's score.
    """
    check_kind(kind)
    metric = get_metric(metric)
    check_method_metric(method, metric.name)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if aggregate not in (AGGREGATES if method == "gradient" else estimators.names()):
        known = AGGREGATES if method == "gradient" else estimators.names()
        raise ValueError(f"unknown aggregate {aggregate!r} for method={method!r}: use one of {', '.join(known)}")
    prep = _prepare(model, tokens, loss_mask, attention_mask, pack, share_prefix)
    ans, B = prep.ans, prep.packed.num_examples
    groups = estimators.subset_groups(B, subsets)
    onehot = np.zeros((len(groups), B), np.float32)
    for k, g in enumerate(groups):
        onehot[k, g] = 1.0
    subset_count = onehot @ ans.count
    if np.any(subset_count == 0):
        k = int(np.argmin(subset_count))
        raise ValueError(
            f"subset {k} (examples {groups[k][0]}..{groups[k][-1]}) has no answer tokens: "
            "shuffle the calibration set or use fewer subsets"
        )
    if mesh is not None:
        params = sharding.shard_params(params, mesh)
    # One path for every kind and metric: the kind's replacements (zero: no head replacement, the
    # head mask alone), the metric at the answer tokens.
    reps = replacements(model, params, prep, kind)
    ref = intact_log_probs(model, params, prep.rows, prep.packed_ans) if metric.needs_ref else None
    intact = to_host(intact_values(model, params, prep.rows, prep.packed_ans, B, metric, ref)).astype(np.float64)  # [B]
    baseline = onehot @ intact / subset_count
    _check_finite(baseline, "intact calibration loss")

    if method == "gradient":  # -d loss_k / d head keep at the intact model, per subset k: [U, L, H]
        masked = (
            baseline[:, None, None]
            + gradient_deltas(
                model,
                params,
                prep,
                metric=metric,
                components=("heads",),
                weights=onehot,
                norm=subset_count,
                replacements=reps,
            )["heads"]
        )
    else:
        nll = _ablation_nll(
            model,
            params,
            prep,
            chunk_size,
            checkpoint_dir,
            layers_per_call,
            progress,
            fingerprint_args=(tokens, loss_mask, prep.attention_mask),
            mesh=mesh,
            metric=metric,
            ref=ref,
            reps=reps,
            # zero / ce keep their old fingerprint, so their checkpoint folders stay where they were
            custom=None if (kind, metric.name) == ("zero", "ce") else (kind, metric.name),
            resume=resume,
        )  # [L, H, B]
        masked = np.einsum("lhb,kb->klh", nll, onehot) / subset_count[:, None, None]
    _check_finite(masked, "masked calibration loss")
    if method == "gradient":
        return HeadScores(
            aggregate_scores(masked, baseline, aggregate),
            masked,
            baseline,
            aggregate,
            method,
            kind=kind,
            metric=metric.name,
        )
    # The delta comes from the per-example results through the estimator registry (capjax.estimators).
    # delta: a placeholder that with_aggregate replaces
    scores = HeadScores(
        np.empty(0),
        masked,
        baseline,
        aggregate,
        method,
        np.asarray(nll, np.float64),
        intact,
        np.asarray(ans.count, np.float64),
        kind=kind,
        metric=metric.name,
    ).with_aggregate(aggregate)
    return scores.with_interval(bootstrap) if bootstrap else scores


def scoring_flops(
    config,
    rows: int,
    seq_len: int,
    answer_tokens: int,
    layers: range | None = None,
    baseline: bool = True,
    prefix: int = 0,
) -> float:
    """Matmul FLOPs of exact scoring as `score_heads` schedules it, on a packed batch [rows, seq_len]
    (the shared prefix's row included) with A = answer_tokens and Pf = `prefix` shared tokens: the
    intact layers below the first scored layer; per scored layer l its intact carry and H ablations
    of (L - 1 - l) full layers, the last layer (o_proj and MLP at the A answer rows only) and the LM
    head on A rows; plus, with `baseline`, the intact forward. Attention is counted dense
    (4 N (Pf + S) H D per layer on N = rows * seq_len tokens)."""
    c = config
    E, F, H, K, D, L, V = (
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.num_layers,
        c.vocab_size,
    )
    layers = range(L) if layers is None else layers
    N, A = rows * seq_len, answer_tokens
    attention = 4 * N * (prefix + seq_len) * H * D
    full = 2 * N * (2 * E * H * D + 2 * E * K * D + 3 * E * F) + attention
    last = 2 * N * (E * H * D + 2 * E * K * D) + attention + 2 * A * (E * H * D + 3 * E * F)
    head = 2 * A * E * V
    total = layers.start * full + sum(full + H * ((L - 1 - l) * full + last + head) for l in layers)
    return total + (L * full + head if baseline else 0)


def _layer_groups(L: int, per_call: int) -> list[tuple[int, int]]:
    """Contiguous (start, size) groups of equal size (a divisor of L, so one compile serves all)."""
    size = max(d for d in range(1, L + 1) if L % d == 0 and d <= max(1, per_call))
    return [(s, size) for s in range(0, L, size)]


def _ablation_nll(
    model,
    params,
    prep: _Prepared,
    chunk_size,
    checkpoint_dir,
    layers_per_call,
    progress,
    fingerprint_args: tuple[Any, Any, Any],
    mesh=None,
    metric: Metric = CE,
    ref=None,
    reps=None,
    custom=None,
    resume: bool = True,
) -> np.ndarray:
    c = model.config
    L, H = c.num_layers, c.num_heads
    packed, rows, ans = prep.packed, prep.rows, prep.packed_ans
    B = packed.num_examples
    per_device = H if mesh is None else -(-H // sharding.axis_size(mesh, sharding.DATA))
    chunk = min(
        chunk_size or default_chunk_size(c, *prep.shape, model.dtype, answer_tokens=ans[0].shape[0]), per_device
    )
    if layers_per_call is None:
        layers_per_call = L if checkpoint_dir is None else max(1, math.ceil(L / 8))
    groups = _layer_groups(L, layers_per_call)
    store = None
    if checkpoint_dir is not None:
        # The requested chunk, not the memory-derived one, so that a resume does not depend on free memory.
        requested = min(chunk_size, H) if chunk_size else None
        layout = hashlib.sha256(packed.segment_ids.tobytes()).hexdigest()
        extra = (requested, len(groups), layout) + ((custom,) if custom else ())  # zero / ce: old checkpoints resume
        fp = _fingerprint(model, params, *fingerprint_args, extra)
        store = _GroupStore(Path(checkpoint_dir), fp, resume)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=L, desc=f"scoring {L * H} heads", unit="layer")
    out = np.zeros((L, H, B), np.float64)
    state = {"chunk": chunk}
    with showing(bar):
        for start, size in groups:
            done = store.load(start) if store else None
            if done is not None and (done.shape != (size, H, B) or not np.all(np.isfinite(done))):
                done = None  # a damaged or foreign group: recompute it
            if done is None:

                def run(ch, start=start, size=size):
                    state["chunk"] = ch  # keep a chunk reduced after an out-of-memory error
                    if bar is not None:  # a failed attempt may have ticked some layers
                        bar.n = start
                    return to_host(
                        _single_head_nll(
                            model,
                            params,
                            rows,
                            ans,
                            B,
                            start,
                            size,
                            ch,
                            progress=bar is not None,
                            mesh=mesh,
                            metric=metric,
                            ref=ref,
                            reps=reps,
                        )
                    )

                done = run_with_oom_fallback(run, state["chunk"])
                if store:
                    store.save(start, done)
            elif bar is not None:
                bar.update(size)
            out[start : start + size] = done
    return out


class _GroupStore:
    """Checkpoints of finished layer groups under dir/<fingerprint>/layers_<start> (`capjax.checkpoints`:
    orbax's CheckpointManager, atomic steps), each stamped with the capjax code that computed it. A
    group of other code, or one recording none, is recomputed with a log line; with resume=False every
    group is (the folder's groups are deleted first). A folder in the layout of capjax before
    CheckpointManager is refused in one line (resume=False deletes it instead)."""

    def __init__(self, root: Path, fingerprint: str, resume: bool = True):
        from capjax.checkpoints import Checkpoints
        from capjax.provenance import code_version

        self.dir = (Path(root) / fingerprint).absolute()
        self.resume = resume
        self.code = code_version()
        self.ckpt = Checkpoints(
            self.dir,
            "layers",
            code=self.code,
            digits=4,
            clear=not resume,
            fix="delete it, or rerun with --recompute (score_heads(resume=False))",
        )

    def _path(self, start: int) -> Path:
        return self.ckpt.path(start)

    def load(self, start: int) -> np.ndarray | None:
        from capjax.artifacts import warn

        path = self._path(start)
        if not self.resume or start not in self.ckpt.steps():
            return None
        try:
            code = self.ckpt.code_of(start)
            nll = np.asarray(self.ckpt.restore(start)["nll"]) if code == self.code else None
        except Exception as e:  # orbax raises many types for a damaged folder; all mean "redo this group"
            warn(f"{path} is unreadable ({type(e).__name__}); recomputing layers from {start}")
            return None
        if code != self.code:
            warn(
                f"{path} was computed by capjax {code or 'of an unrecorded version'} (this is {self.code}); "
                f"recomputing layers from {start}"
            )
        return nll

    def save(self, start: int, nll: np.ndarray) -> None:
        self.ckpt.save(start, {"nll": np.asarray(nll)})
