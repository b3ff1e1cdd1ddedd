"""Any ablation, any metric, per-example results, in one jitted vmapped call.

Legend: N ablations, B examples, L layers, H query heads, P packed rows, S packed columns,
A answer tokens, E hidden, V vocab.

    batch = prepare_batch(model, tokens, loss_mask, attention_mask)
    spec = single_spec(model.config, "mlp")                      # {"heads", "mlp", "attn"}: N masks
    res = ablate(model, params, batch, spec, kind="mean", metric="kl")
    res.values      [N, B]  metric summed over each example's answer tokens, under each ablation
    res.intact      [B]     the same, intact
    res.delta()     [N]     token-level change of the metric (what CAP scores)

The exact fast paths are kept: the examples are packed into rows (shared prefix once), and the
last layer and the metric run only at the answer positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from capjax import sharding
from capjax.ablation.batch import PreparedBatch
from capjax.ablation.kinds import replacements as make_replacements
from capjax.ablation.metrics import Metric, get_metric
from capjax.ablation.readout import answer_values
from capjax.ablation.single import single_unit_values
from capjax.ablation.spec import num_ablations
from capjax.distributed import to_host
from capjax.memory import chunk_size_for_memory, run_with_oom_fallback
from capjax.model import VOCAB_CHUNK, apply_layer, layer_context, layer_params, unembed
from capjax.scan import scan_layers
from capjax.sites import Edit, Interventions

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AblationResult:
    """values [N, B]: the metric summed over each example's answer tokens under each ablation;
    intact [B]: the same without ablation; count [B]: answer tokens per example."""

    values: np.ndarray
    intact: np.ndarray
    count: np.ndarray
    metric: str = "ce"
    kind: str = "zero"

    def per_example(self) -> np.ndarray:
        """[N, B] the metric's mean over each example's answer tokens."""
        return self.values / self.count

    def loss(self) -> np.ndarray:
        """[N] token-level metric of the whole batch (sum over answer tokens / their count)."""
        return self.values.sum(axis=1) / self.count.sum()

    def intact_loss(self) -> float:
        return float(self.intact.sum() / self.count.sum())

    def delta(self) -> np.ndarray:
        """[N] token-level change under each ablation (higher = more important)."""
        return self.loss() - self.intact_loss()


def spec_interventions(spec_one: dict, reps: dict) -> Interventions:
    """The interventions (`capjax.sites`, stacked over layers) of one spec (any of heads [L, H],
    mlp [L], attn [L]) with replacements (`capjax.ablation.kinds`): attn.z keeps spec["heads"] and
    is replaced by reps["heads"] (zero when None), attn.out / mlp.out are mixed with theirs by the
    spec's keep. A component the spec leaves out adds no operation (a head mask alone is bit for bit
    `Decoder(head_mask=...)`)."""
    edits = {}
    if "heads" in spec_one:
        edits["attn.z"] = Edit(spec_one["heads"], reps.get("heads"))
    for component, site in (("attn", "attn.out"), ("mlp", "mlp.out")):
        if component in spec_one:
            edits[site] = Edit(spec_one[component], reps[component])
    return Interventions(edits)


def layer_ablation(spec_one: dict, reps: dict, l) -> Interventions:
    """Layer l's slice of `spec_interventions`."""
    return spec_interventions(spec_one, reps).at(l)


def first_ablated_layer(spec_one: dict) -> Array:
    """The lowest layer whose components are not all intact (L - 1 when none is), int32 scalar."""
    parts = [spec_one[k] != 1 for k in ("mlp", "attn") if k in spec_one]
    if "heads" in spec_one:
        parts.append(jnp.any(spec_one["heads"] != 1, axis=1))
    touched = parts[0]
    for p in parts[1:]:
        touched = touched | p
    L = touched.shape[0]
    return jnp.minimum(jnp.where(jnp.any(touched), jnp.argmax(touched), L - 1), L - 1).astype(jnp.int32)


def intervened_values(
    model,
    params,
    rows,
    ans,
    num_examples: int,
    metric: Metric,
    ref,
    iv: Interventions | None = None,
    start=0,
    inputs: Array | None = None,
) -> Array:
    """The one scoring kernel: the metric summed per example [B] on packed rows (tokens,
    segment_ids, positions [P, S], prefix [Pf]) under interventions iv (`capjax.sites`, stacked
    over layers; None: intact), the last layer and the metric only at the answer positions ans.

    With `inputs` [L, P, S, E] (every layer's intact input, `intact_inputs`), the layers below
    `start` (the first one iv touches) are not recomputed: prefix reuse."""
    L = model.config.num_layers
    tokens, segment_ids, positions, prefix = rows
    x, ctx = layer_context(
        model, params, tokens, positions=positions, segment_ids=segment_ids, prefix_len=prefix.shape[0]
    )
    if inputs is not None:
        x = inputs[start]
    x = scan_layers(model, params, x, ctx, start, L - 1, iv)
    return answer_values(
        model, params, x, ctx, ans, num_examples, metric, ref, ablation=None if iv is None else iv.at(L - 1)
    )


def ablated_values(
    model,
    params,
    rows,
    ans,
    num_examples: int,
    metric: Metric,
    ref,
    reps: dict,
    spec_one: dict,
    inputs: Array | None = None,
) -> Array:
    """The metric summed per example [B] under one ablation spec_one (any of {"heads": [L, H],
    "mlp": [L], "attn": [L]}) with replacements reps, on packed rows: `intervened_values` of
    `spec_interventions`. With `inputs` (`intact_inputs`), the layers below the first ablated one
    are not recomputed (prefix reuse; not differentiable in spec_one)."""
    spec_one = {k: v.astype(model.dtype) for k, v in spec_one.items()}
    start = 0 if inputs is None else first_ablated_layer(spec_one)
    return intervened_values(
        model, params, rows, ans, num_examples, metric, ref, spec_interventions(spec_one, reps), start, inputs
    )


@partial(jax.jit, static_argnames=("model", "num_examples", "metric", "chunk_size", "mesh"))
def values_batch(model, params, rows, ans, num_examples, metric, ref, reps, specs, chunk_size, inputs=None, mesh=None):
    """`ablated_values` [N, B] for every ablation of specs (any of heads [N, L, H], mlp / attn
    [N, L]): `lax.map` over chunks of chunk_size, or split over the mesh's "data" axis."""

    def one(spec_one):
        return ablated_values(model, params, rows, ans, num_examples, metric, ref, reps, spec_one, inputs)

    if mesh is None:
        return jax.lax.map(one, specs, batch_size=chunk_size)
    # sharded_map splits one array: the spec's components side by side [N, sum of sizes], split back per row.
    keys = sorted(specs)
    shapes = [specs[k].shape[1:] for k in keys]
    sizes = [math.prod(s) for s in shapes]
    flat = jnp.concatenate([specs[k].reshape(specs[k].shape[0], -1) for k in keys], axis=1)

    def one_flat(row):
        parts = jnp.split(row, np.cumsum(sizes)[:-1])
        return one({k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)})

    return sharding.sharded_map(one_flat, flat, chunk_size, mesh)


@partial(jax.jit, static_argnames=("model", "num_examples", "metric"))
def intact_values(model, params, rows, ans, num_examples, metric: Metric, ref=None) -> Array:
    """Intact per-example metric sums [B] on packed rows."""
    return intervened_values(model, params, rows, ans, num_examples, metric, ref)


@partial(jax.jit, static_argnames=("model",))
def intact_inputs(model, params, rows) -> Array:
    """Every layer's intact input [L, P, S, E] on packed rows (layer 0's is the embedding)."""
    tokens, segment_ids, positions, prefix = rows
    x, ctx = layer_context(
        model, params, tokens, positions=positions, segment_ids=segment_ids, prefix_len=prefix.shape[0]
    )
    return scan_layers(model, params, x, ctx, collect="inputs")[1]


@partial(jax.jit, static_argnames=("model",))
def intact_log_probs(model, params, rows, ans) -> Array:
    """Intact log-probs [A, V] at the answer positions (the reference of the "kl" metric)."""
    L = model.config.num_layers
    tokens, segment_ids, positions, prefix = rows
    x, ctx = layer_context(
        model, params, tokens, positions=positions, segment_ids=segment_ids, prefix_len=prefix.shape[0]
    )
    x = scan_layers(model, params, x, ctx, 0, L - 1)
    h = apply_layer(model, layer_params(params, L - 1), x, ctx, rows=ans[0], layer=L - 1)
    return jax.nn.log_softmax(unembed(model, params, h), axis=-1)


def _ones_spec(config, n: int = 1) -> dict:
    return {
        "heads": jnp.ones((n, config.num_layers, config.num_heads), jnp.float32),
        "mlp": jnp.ones((n, config.num_layers), jnp.float32),
        "attn": jnp.ones((n, config.num_layers), jnp.float32),
    }


def single_heads_keep(config, spec: dict) -> float | None:
    """keep when `spec` is exactly `single_spec(config, "heads", keep)` (every head alone, in layer-major
    order, at one common value keep < 1, nothing else ablated), else None."""
    L, H = config.num_layers, config.num_heads
    heads = np.asarray(spec.get("heads", np.ones((0, L, H))))
    if heads.shape != (L * H, L, H) or any(not np.all(np.asarray(spec[k]) == 1) for k in spec if k != "heads"):
        return None
    keep = float(heads[0, 0, 0])
    expected = np.ones((L * H, L * H), heads.dtype)
    np.fill_diagonal(expected, keep)
    return keep if keep < 1 and np.array_equal(heads.reshape(L * H, L * H), expected) else None


def ablate(
    model,
    params,
    batch: PreparedBatch,
    spec: dict,
    kind: str = "zero",
    metric: str | Metric | Callable = "ce",
    seed: int = 0,
    replacements: dict | None = None,
    chunk_size: int | None = None,
    reuse_prefix: bool = True,
    mesh=None,
) -> AblationResult:
    """Per-example metric under every ablation of `spec` ({"heads": [N, L, H], "mlp": [N, L],
    "attn": [N, L]}, `capjax.ablation.spec`) with replacements of `kind` (zero | mean | resample;
    `seed` for resample's pairing), or precomputed `replacements`. One jitted function: `lax.map`
    over chunks of `chunk_size` ablations (default from free memory; halved on out-of-memory).
    With `reuse_prefix`, each ablation starts from the intact input of its first ablated layer
    (computed once); order the spec by that layer (as `single_spec` does) so a chunk shares it.
    The single-head spec (`single_spec(config, "heads", keep)`) runs on the layer scan of
    `capjax.ablation.single_unit_values` (each layer's H ablations share its intact input).
    With `mesh` (`capjax.sharding.make_mesh`), params are sharded by `sharding.DEFAULT_RULES` and the
    N ablations are split over its "data" axis (`chunk_size` per device)."""
    c = model.config
    if mesh is not None:
        params = sharding.shard_params(params, mesh)
    n = num_ablations(spec)
    # Only the components the spec has are edited (a component left out costs nothing).
    specs = {k: jnp.asarray(v, model.dtype) for k, v in spec.items() if k in ("heads", "mlp", "attn")}
    specs = specs or {"heads": jnp.ones((n, c.num_layers, c.num_heads), model.dtype)}
    metric = get_metric(metric)
    reps = replacements if replacements is not None else make_replacements(model, params, batch, kind, seed)
    ref = intact_log_probs(model, params, batch.rows, batch.packed_ans) if metric.needs_ref else None
    B = batch.num_examples
    chunk = chunk_size or chunk_size_for_memory(
        c,
        *batch.shape,
        model.dtype,
        answer_tokens=batch.num_answer_tokens,
        vocab_chunk=VOCAB_CHUNK if metric.name == "ce" else None,
        max_chunk=max(n, 1),
    )

    keep = single_heads_keep(c, spec) if reuse_prefix else None
    if keep is not None:

        def run(ch):
            return (
                to_host(
                    single_unit_values(
                        model,
                        params,
                        batch.rows,
                        batch.packed_ans,
                        B,
                        metric,
                        ref,
                        reps,
                        0,
                        c.num_layers,
                        min(ch, c.num_heads),
                        mesh=mesh,
                        keep=keep,
                    )
                )
                .astype(np.float64)
                .reshape(n, B)
            )
    else:
        inputs = intact_inputs(model, params, batch.rows) if reuse_prefix else None

        def run(ch):
            return to_host(
                values_batch(
                    model,
                    params,
                    batch.rows,
                    batch.packed_ans,
                    B,
                    metric,
                    ref,
                    reps,
                    specs,
                    min(ch, n),
                    inputs,
                    mesh=mesh,
                )
            ).astype(np.float64)

    values = run_with_oom_fallback(run, chunk)
    intact = np.asarray(intact_values(model, params, batch.rows, batch.packed_ans, B, metric, ref), np.float64)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(intact))):
        raise FloatingPointError(
            f"ablate: non-finite {metric.name} values; check the params (NaN weights?) or use float32"
        )
    return AblationResult(values, intact, batch.count.astype(np.float64), metric.name, kind)


@partial(jax.jit, static_argnames=("model", "num_examples", "metric"))
def values_jacobian(model, params, rows, ans, num_examples, metric, ref, reps, spec_one, weights, norm):
    """d (weights @ values / norm) / d spec_one at spec_one: {component: [U, ...]} for weights [U, B]
    and norm [U] (the identity and ones: per example; a subset one-hot and its answer counts: per
    subset token-level losses). One reverse pass per row of weights."""

    def losses(spec):
        return weights @ ablated_values(model, params, rows, ans, num_examples, metric, ref, reps, spec) / norm

    return jax.jacrev(losses)(spec_one)


def gradient_deltas(
    model,
    params,
    batch: PreparedBatch,
    kind: str = "zero",
    metric: str | Metric | Callable = "ce",
    seed: int = 0,
    components=("heads", "mlp", "attn"),
    weights=None,
    norm=None,
    replacements: dict | None = None,
) -> dict[str, np.ndarray]:
    """First-order estimate of values(ablated) - values(intact) for every single unit: -d values_b /
    d keep at all ones (Michel et al. 2019), one reverse pass per example: {"heads": [B, L, H],
    "mlp": [B, L], "attn": [B, L]} (the `components` asked for). With weights [U, B] and norm [U],
    the same for weights @ values / norm instead of values: [U, ...] (one reverse pass per row)."""
    metric = get_metric(metric)
    reps = replacements if replacements is not None else make_replacements(model, params, batch, kind, seed)
    ref = intact_log_probs(model, params, batch.rows, batch.packed_ans) if metric.needs_ref else None
    ones = {k: v[0] for k, v in _ones_spec(model.config).items() if k in components}
    B = batch.num_examples
    weights = jnp.eye(B, dtype=jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    norm = jnp.ones((weights.shape[0],), jnp.float32) if norm is None else jnp.asarray(norm, jnp.float32)
    jac = values_jacobian(model, params, batch.rows, batch.packed_ans, B, metric, ref, reps, ones, weights, norm)
    return {k: -np.asarray(to_host(v), np.float64) for k, v in jac.items()}


__all__ = [
    "AblationResult",
    "ablate",
    "ablated_values",
    "answer_values",
    "first_ablated_layer",
    "gradient_deltas",
    "intact_inputs",
    "intact_log_probs",
    "intact_values",
    "intervened_values",
    "layer_ablation",
    "single_heads_keep",
    "spec_interventions",
    "values_batch",
    "values_jacobian",
]
