"""`prune(model, params, method, sparsity, ...)` and `sparsity_report(params, masks)`.

Masks have the params' tree structure: a bool array (True = kept) at each of the seven prunable
kernels, None at every other leaf. `pruned = apply_masks(updated, masks)`, where `updated` is
`params` except for SparseGPT, whose OBS updates change the kept weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax import artifacts
from capjax.distributed import to_host
from capjax.errors import NonFiniteError
from capjax.families import family_of
from capjax.pruning import registry
from capjax.pruning.importance import PRUNABLE, get_kernels, get_path, head_delta, importance_from_scores
from capjax.pruning.methods import Job
from capjax.pruning.nm import check_divisible, parse_nm
from capjax.token_ids import check_token_ids

Params = dict[str, Any]


def _calib_arrays(calib: Any) -> tuple[np.ndarray, np.ndarray]:
    """tokens, attention_mask [B, T] from a CalibrationBatch-like object or a dict."""
    get = (lambda k: calib.get(k)) if isinstance(calib, dict) else (lambda k: getattr(calib, k, None))
    tokens = get("tokens")
    if tokens is None:
        raise ValueError("calibration data has no tokens")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(f"calibration tokens must be a non-empty [B, T] array, got shape {list(tokens.shape)}")
    am = get("attention_mask")
    am = np.ones(tokens.shape, np.int32) if am is None else np.asarray(am).astype(np.int32)
    if am.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {list(am.shape)} != tokens shape {list(tokens.shape)}")
    if am.sum() == 0:
        raise ValueError("calibration data has no real tokens (attention_mask is all zero)")
    return tokens.astype(np.int32), am


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """A method's options merged over its defaults; a ValueError naming a wrong name, type or choice."""
    spec = registry.spec(method)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ValueError(f"method {method!r} does not take option(s) {', '.join(unknown)} (allowed: {allowed})")
    merged = {**spec.options, **options}
    for name, default in spec.options.items():
        value = merged[name]
        if isinstance(default, str):
            continue  # a choice, checked below
        wrong_type = (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(default, int) and not isinstance(value, int))
        )
        if wrong_type or value < 0 or (value == 0 and name != "seed" and default != 0):
            kind = "non-negative integer" if name == "seed" else f"positive {type(default).__name__}"
            raise ValueError(f"{method} option {name}={value!r}: expected a {kind}")
    for name, choices in spec.choices.items():
        if merged[name] not in choices:
            raise ValueError(f"{method} option {name}={merged[name]!r}: use one of {', '.join(choices)}")
    return merged


def _rebuild(params: Params, leaves: dict[str, Any], default: Any) -> Params:
    """A tree shaped like params: leaves[path] at the prunable paths, default(leaf) elsewhere."""

    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in node.items()}
        return leaves[prefix] if prefix in leaves else default(node)

    return walk(params, "")


def flat_masks(masks: Params) -> dict[str, Any]:
    """{"layers/self_attn/q_proj/kernel": bool array, ...}: the seven prunable masks by path."""
    return {p: get_path(masks, p) for p in PRUNABLE}


def read_masks_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The keep masks of a masks.npz that `capjax prune` writes, by prunable path; a missing,
    unreadable or incomplete file is one error naming it (read before any model loads)."""
    return artifacts.read_masks(path, tuple(PRUNABLE))


def masks_digest(flat: dict[str, Any]) -> str:
    """20 hex digits of SHA-256 over the keep masks {prunable path: bool array} (paths, shapes and
    bits), so two masks files are compared by content however they were saved."""
    return artifacts.masks_digest(flat, tuple(PRUNABLE))


def masks_from_flat(params: Params, flat: dict[str, Any]) -> Params:
    """Inverse of `flat_masks`: a masks tree shaped like params (None at non-prunable leaves); a
    ValueError naming the first mask whose shape is not its kernel's (masks of another model)."""
    for p in PRUNABLE:
        want, got = tuple(get_path(params, p).shape), tuple(np.shape(flat[p]))
        if got != want:
            raise ValueError(
                f"mask {p} is {list(got)} but this model's kernel is {list(want)}: the masks come "
                "from another model; use the masks.npz written when this model was pruned"
            )
    return _rebuild(params, {p: np.asarray(flat[p]).astype(bool) for p in PRUNABLE}, lambda _: None)


def replace_kernels(params: Params, kernels: dict[str, Any]) -> Params:
    """params with the prunable kernels given by path replaced (the other leaves shared)."""
    return _rebuild(params, kernels, lambda a: a)


def apply_masks(params: Params, masks: Params) -> Params:
    """params * masks leafwise; leaves whose mask is None are returned unchanged."""
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
        masks,
        params,
        is_leaf=lambda x: x is None,
    )


def _placed(tree: Params, mesh: Any) -> Params:
    """`tree` (params, or masks with None leaves) sharded by the default rules; as is without a mesh."""
    if mesh is None:
        return tree
    from capjax.sharding import shard_params

    return shard_params(tree, mesh)


@jax.jit
def _nonfinite_counts(kernels):
    return {p: jnp.sum(~jnp.isfinite(w), dtype=jnp.int32) for p, w in kernels.items()}


@jax.jit
def _finalize(kernels, new, keep):
    keep = {p: jnp.asarray(keep[p]).astype(bool) for p in PRUNABLE}
    out = {p: jnp.where(keep[p], new[p].astype(w.dtype), jnp.zeros((), w.dtype)) for p, w in kernels.items()}
    return out, keep


def prune(
    model: Any,
    params: Params,
    method: str,
    sparsity: float,
    *,
    head_scores: Any = None,
    calib: Any = None,
    nm: Any = None,
    mesh: Any = None,
    **method_options: Any,
) -> tuple[Params, Params]:
    """Prunes the seven projection kernels of every layer. Returns (pruned_params, masks).

    method: a registered name (`capjax.pruning.registry.names()`: cap, cap_wanda, cap_heads, wanda,
        sparsegpt, magnitude, random, and any method registered with `register_method`).
    sparsity: fraction of prunable weights removed, in [0, 1) (cap_heads: fraction of heads).
        With `nm` it must be 0 or N / M: the pattern sets it.
    head_scores: HeadScores-like (`.delta` [L, H]) or an [L, H] array; required by the cap family.
    calib: CalibrationBatch-like (`.tokens`, `.attention_mask` [B, T]) or a dict with those keys;
        required by wanda, cap_wanda, sparsegpt.
    nm: (N, M) or "N:M" semi-structured sparsity (not for cap_heads).
    mesh: a jax Mesh (`capjax.sharding.make_mesh`): params are sharded by
        `capjax.sharding.DEFAULT_RULES`, calibration chunks split over "data", and the pruned
        params and the masks come back with the params' shardings.
    method_options: cap: kv_rule ("mean" | "max"), scope ("global" | "layer"); cap_wanda: kv_rule;
        magnitude: scope ("matrix" | "global"); random: seed; sparsegpt: blocksize, percdamp;
        wanda / cap_wanda / sparsegpt: batch_size (calibration sequences per forward pass).
    """
    spec = registry.spec(method)  # an unknown name lists the registered ones
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    nm = parse_nm(nm)
    options = check_options(method, method_options)
    config = model.config
    params = _placed(params, mesh)
    kernels = get_kernels(params, family_of(config))
    bad = [p for p, n in _nonfinite_counts(kernels).items() if int(n)]
    if bad:
        raise NonFiniteError(
            f"NaN or Inf weights in {', '.join(bad)}: cannot rank them for pruning; "
            "check the checkpoint (or load it in float32)"
        )
    if nm is not None:
        if method == "cap_heads":
            raise ValueError("cap_heads removes whole heads; N:M sparsity does not apply to it")
        check_divisible(_in_widths(kernels), nm[1])
        if sparsity and abs(sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(
                f"N:M {nm[0]}:{nm[1]} sets the sparsity to {nm[0] / nm[1]:g}; pass sparsity=0 "
                f"(or {nm[0] / nm[1]:g}) instead of {sparsity:g}, or drop nm"
            )
    importance = delta = None
    if spec.needs_scores:
        if head_scores is None:
            raise ValueError(f"method {method!r} needs head_scores (HeadScores or an [L, H] array of delta)")
        importance = importance_from_scores(head_scores, (config.num_layers, config.num_heads))
        delta = head_delta(head_scores)
    tokens = am = None
    if spec.needs_calib:
        if calib is None:
            raise ValueError(f"method {method!r} needs calib (tokens and attention_mask [B, T])")
        tokens, am = _calib_arrays(calib)
        check_token_ids(tokens, config.vocab_size, "calibration tokens")
    if sparsity == 0.0 and nm is None:  # reference rules would still prune one weight per group
        masks = {p: jnp.ones(k.shape, bool) for p, k in kernels.items()}
        return params, _placed(_rebuild(params, masks, lambda _: None), mesh)
    loss_mask = calib.get("loss_mask") if isinstance(calib, dict) else getattr(calib, "loss_mask", None)
    job = Job(model, params, kernels, sparsity, nm, importance, delta, tokens, am, options, mesh, loss_mask)
    new, keep = spec.fn(job)
    out, keep = _finalize(kernels, new, keep)
    return _placed(_rebuild(params, out, lambda a: a), mesh), _placed(_rebuild(params, keep, lambda _: None), mesh)


def _in_widths(kernels: dict[str, Any]) -> dict[str, int]:
    """{path: input width} of the prunable kernels [L, in..., out...]: what N:M groups run along."""
    return {p: int(np.prod(k.shape[1 : 1 + PRUNABLE[p]])) for p, k in kernels.items()}


def check_nm_fits(config: Any, nm: Any) -> None:
    """ValueError unless the N:M pattern `nm` applies to every prunable matrix of a model with
    `config`: known from the shapes alone, before any weight loads."""
    from capjax.model import param_shapes

    n_m = parse_nm(nm)
    if n_m is not None:
        check_divisible(_in_widths(get_kernels(param_shapes(config), family_of(config))), n_m[1])


# ---------------------------------------------------------------------------- report
@jax.jit
def _zeros_per_layer(w: jax.Array) -> jax.Array:
    return jnp.sum(w.reshape(w.shape[0], -1) == 0, axis=1, dtype=jnp.int32)


@dataclasses.dataclass
class SparsityReport:
    """Zero counts of the prunable weights. matrices[(layer, name)] = (zeros, numel), with name
    like "self_attn.q_proj"."""

    matrices: dict[tuple[int, str], tuple[int, int]]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(n for _, n in self.matrices))

    @property
    def num_layers(self) -> int:
        return 1 + max(l for l, _ in self.matrices)

    def matrix(self, layer: int, name: str) -> float:
        z, n = self.matrices[(layer, name)]
        return z / n

    def layer(self, layer: int) -> float:
        zs = [v for (l, _), v in self.matrices.items() if l == layer]
        return sum(z for z, _ in zs) / sum(n for _, n in zs)

    @property
    def total(self) -> float:
        return sum(z for z, _ in self.matrices.values()) / sum(n for _, n in self.matrices.values())

    @property
    def zeros(self) -> int:
        return sum(z for z, _ in self.matrices.values())

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.matrices.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "zeros": self.zeros,
            "numel": self.numel,
            "layers": {str(l): self.layer(l) for l in range(self.num_layers)},
            "matrices": {
                f"layers.{l}.{n}": {"zeros": z, "numel": c, "sparsity": z / c}
                for (l, n), (z, c) in self.matrices.items()
            },
        }

    def table(self) -> str:
        names = self.names
        short = [n.split(".")[-1] for n in names]
        widths = [max(len(s), 7) for s in short]
        head = "layer  " + "  ".join(s.rjust(w) for s, w in zip(short, widths)) + "    layer"
        lines = [head]
        for l in range(self.num_layers):
            cells = "  ".join(f"{100 * self.matrix(l, n):6.2f}%".rjust(w) for n, w in zip(names, widths))
            lines.append(f"{l:<5}  {cells}  {100 * self.layer(l):6.2f}%")
        lines.append(f"total sparsity {100 * self.total:.4f}% ({self.zeros} / {self.numel} prunable weights are zero)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def sparsity_report(params: Params, masks: Params | None = None) -> SparsityReport:
    """Per-matrix, per-layer and total sparsity (zeros) of the prunable kernels of `params`
    (after applying `masks` when given)."""
    counts = {}
    for p in PRUNABLE:
        w = get_path(params, p)
        if masks is not None and get_path(masks, p) is not None:
            w = jnp.where(get_path(masks, p), w, jnp.zeros((), w.dtype))
        counts[".".join(p.split("/")[1:3])] = (to_host(_zeros_per_layer(w)), int(np.prod(w.shape[1:])))
    L = len(next(iter(counts.values()))[0])
    return SparsityReport({(l, name): (int(z[l]), n) for l in range(L) for name, (z, n) in counts.items()})
