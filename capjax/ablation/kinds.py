"""Ablation kinds: what replaces an ablated component's output.

Legend: L layers, P packed rows, S packed columns, H query heads, D head dim, E hidden, B examples.

    zero      0 (the paper's head ablation)
    mean      the component's output averaged over the calibration tokens (real tokens up to each
              example's last answer token; a shared prefix counts once per example), from one
              intact pass
    resample  its intact output on another calibration example at the same position (a fixed
              seeded pairing `resample_pairing`, a single cycle, so no example is paired with
              itself); when the other example is shorter, its last kept position

Replacements are a dict {"heads": None | [L, H, D] | [L, P, S, H, D], "attn": [L, E] | [L, P, S, E],
"mlp": same} on the packed rows of a `PreparedBatch` (constant for zero / mean, per position for
resample).

Kinds are a registry like metrics and estimators: `register_kind(name, fn)` with
fn(model, params, batch, seed) -> replacements makes `kind=name` work in `ablate`, `score_heads`,
`capjax score --kind` and a config's `calibration.kind` (from `CAPJAX_PLUGINS` too).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from capjax.ablation.batch import PreparedBatch
from capjax.model import layer_context
from capjax.plugins import load_plugins
from capjax.registry import Registry
from capjax.scan import scan_layers
from capjax.sites import Interventions

KINDS = ("zero", "mean", "resample")  # the built-ins; `names()` adds the registered ones
# name -> fn(model, params, batch, seed) -> replacements; the built-ins' entry is None (`replacements`
# computes them itself)
_REGISTERED: Registry[Callable | None] = Registry(
    "ablation kind",
    on_read=load_plugins,
    replace_builtins=False,
    unknown="unknown ablation kind {name!r}: use one of {known}, or register one (capjax.ablation.register_kind)",
)
for _kind in KINDS:
    _REGISTERED.register(_kind, None, builtin=True)


def names() -> tuple[str, ...]:
    """Every ablation kind: the built-ins, then yours and plugins'."""
    return _REGISTERED.names()


def register_kind(name: str, fn: Callable, replace: bool = False) -> None:
    """Registers fn(model, params, batch: PreparedBatch, seed) -> replacements (module docstring) as
    ablation kind `name`."""
    _REGISTERED.register(name, fn, replace=replace)


def unregister_kind(name: str) -> None:
    """Removes a registered kind (tests, or replacing a plugin's); the built-ins stay."""
    _REGISTERED.unregister(name)


def kind_function(name: str) -> Callable | None:
    """The function registered as kind `name` (None for the built-ins, which `replacements` computes)."""
    return _REGISTERED.lookup(name)


def check_kind(kind: str) -> str:
    _REGISTERED.lookup(kind)
    return kind


def resample_pairing(num_examples: int, seed: int = 0) -> np.ndarray:
    """perm [B]: example b takes its replacement from example perm[b] (one random cycle, perm[b] != b
    for B > 1)."""
    order = np.random.default_rng(seed).permutation(num_examples)
    perm = np.empty(num_examples, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def kept_weights(batch: PreparedBatch) -> np.ndarray:
    """[P, S] float: 1 at every example token up to its last answer token, the number of examples at
    each shared prefix token, 0 elsewhere (the mean kind's weights)."""
    p = batch.packed
    seg, loss = p.segment_ids, p.loss_mask > 0
    w = np.zeros(seg.shape, np.float64)
    flat_seg, flat_loss = seg.reshape(-1), loss.reshape(-1)
    idx = np.arange(flat_seg.size)
    for s in np.unique(flat_seg[flat_seg > 0]):
        mine = flat_seg == s
        answers = idx[mine & flat_loss]
        last = answers.max() if answers.size else idx[mine].max()
        w.reshape(-1)[mine & (idx <= last)] = 1.0
    w[seg == -1] = len(np.unique(flat_seg[flat_seg > 0]))
    return w


def resample_source(batch: PreparedBatch, perm: np.ndarray) -> np.ndarray:
    """[P, S] int: flat index (into P * S) of the position whose intact output replaces each position:
    example b's position p takes example perm[b]'s position min(p, its last kept position); shared
    prefix positions and padding keep their own."""
    p = batch.packed
    seg, pos = p.segment_ids.reshape(-1), p.positions.reshape(-1)
    src = np.arange(seg.size)
    w = kept_weights(batch).reshape(-1)
    where = {}  # (example, position) -> flat index
    last: dict[int, int] = {}  # example -> its last kept position
    for i in np.flatnonzero(seg != 0):
        where[(int(seg[i]) - 1 if seg[i] > 0 else -1, int(pos[i]))] = i
        if seg[i] > 0 and w[i] > 0:
            e = int(seg[i]) - 1
            last[e] = max(last.get(e, -1), int(pos[i]))
    Pf = p.prefix_len
    for i in np.flatnonzero(seg > 0):
        e = int(perm[int(seg[i]) - 1])
        if e not in last:
            continue
        q = min(int(pos[i]), last[e])
        src[i] = where[(-1, q)] if q < Pf else where[(e, q)]
    return src.reshape(p.segment_ids.shape)


_COMPONENT_SITES = {"heads": "attn.z", "attn": "attn.out", "mlp": "mlp.out"}


@partial(jax.jit, static_argnames=("model",))
def component_outputs(model, params, rows) -> dict[str, jax.Array]:
    """The intact outputs of every component on packed rows (`PreparedBatch.rows`), the values of the
    sites their ablations edit: {"heads": [L, P, S, H, D] (attn.z, before o_proj), "attn": [L, P, S, E]
    (attn.out), "mlp": [L, P, S, E] (mlp.out)}."""
    tokens, segment_ids, positions, prefix = rows
    x, ctx = layer_context(
        model, params, tokens, positions=positions, segment_ids=segment_ids, prefix_len=prefix.shape[0]
    )
    iv = Interventions(capture=frozenset(_COMPONENT_SITES.values()))
    sites = scan_layers(model, params, x, ctx, iv=iv, collect="sites")[1]
    return {k: sites[site] for k, site in _COMPONENT_SITES.items()}


def replacements(model, params, batch: PreparedBatch, kind: str = "zero", seed: int = 0) -> dict:
    """The replacements of `kind` (module docstring) for every layer's heads, attention block and MLP."""
    c = model.config
    registered = _REGISTERED.lookup(kind)
    if registered is not None:
        return registered(model, params, batch, seed)
    if kind == "zero":
        zeros = jnp.zeros((c.num_layers, c.hidden_size), model.dtype)
        return {"heads": None, "attn": zeros, "mlp": zeros}
    out = component_outputs(model, params, batch.rows)
    if kind == "mean":
        w = jnp.asarray(kept_weights(batch), jnp.float32)
        return {k: _weighted_mean(v, w).astype(model.dtype) for k, v in out.items()}
    src = jnp.asarray(resample_source(batch, resample_pairing(batch.num_examples, seed)).reshape(-1))
    P, S = batch.packed.tokens.shape
    return {k: v.reshape(v.shape[0], P * S, *v.shape[3:])[:, src].reshape(v.shape) for k, v in out.items()}


def _weighted_mean(a: jax.Array, w: jax.Array) -> jax.Array:
    """a [L, P, S, ...] averaged over (P, S) with weights w [P, S] -> [L, ...] (float32)."""
    a = a.astype(jnp.float32)
    return jnp.einsum("lps...,ps->l...", a, w) / w.sum()
