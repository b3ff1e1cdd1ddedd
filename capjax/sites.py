"""Named sites of a decoder layer and the one intervention value that edits or captures them.

Legend: B batch, T query time, S key time, L layers, H query heads, K kv heads, D head dim,
E hidden, F MLP width.

Every layer exposes these sites (value shapes; T new tokens, S keys):

    resid.pre     [B, T, E]     the layer's input (the residual stream before attention)
    attn.in       [B, T, E]     the normed input of attention (input_layernorm's output: what
                                q_proj, k_proj and v_proj read)
    attn.q        [B, T, H, D]  queries (after the family's q_norm, before RoPE)
    attn.k        [B, T, K, D]  keys of the T new tokens (after k_norm, before RoPE)
    attn.v        [B, T, K, D]  values of the T new tokens
    attn.pattern  [B, H, T, S]  post-softmax attention probabilities
    attn.z        [B, T, H, D]  each head's output before o_proj (where CAP ablates a head)
    attn.out      [B, T, E]     o_proj's output (before a sandwich family's post-attention norm)
    resid.mid     [B, T, E]     the residual stream after attention
    mlp.in        [B, T, E]     the normed input of the MLP (what gate_proj and up_proj read)
    mlp.hidden    [B, T, F]     act(gate) * up, the input of down_proj
    mlp.out       [B, T, E]     the MLP's output (before a sandwich family's post-feedforward norm)
    resid.post    [B, T, E]     the layer's output

An `Edit` of a site mixes its value v with

    v' = keep * v + (1 - keep) * replace + add         (each part optional)

keep is a mask over the site's units: [H] / [K] heads for q, z / k, v (or [B, T, H] per
position), [H] or [B, H] heads for the pattern, [F] for mlp.hidden, a scalar (or [B, T]) for the
E-wide sites; replace and add broadcast against the value (e.g. [H, D] per head, or the full
[B, T, ...] per position). `Interventions` holds one Edit per site and the (static) set of sites
to capture. `capjax.model.Decoder` takes it stacked over layers (every leaf [L, ...]);
`capjax.model.apply_layer` one layer's slice. Sites that nothing edits or captures add no
operation at all (docs/interventions.md shows XLA's cost analysis before and after).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

SITES = {
    "resid.pre": "[B, T, E]",
    "attn.in": "[B, T, E]",
    "attn.q": "[B, T, H, D]",
    "attn.k": "[B, T, K, D]",
    "attn.v": "[B, T, K, D]",
    "attn.pattern": "[B, H, T, S]",
    "attn.z": "[B, T, H, D]",
    "attn.out": "[B, T, E]",
    "resid.mid": "[B, T, E]",
    "mlp.in": "[B, T, E]",
    "mlp.hidden": "[B, T, F]",
    "mlp.out": "[B, T, E]",
    "resid.post": "[B, T, E]",
}
# Trailing axes of a site's value that a keep mask does not cover (D of a head; E; T, S of a pattern).
KEEP_EVENT_NDIM = {
    "resid.pre": 1,
    "attn.in": 1,
    "attn.q": 1,
    "attn.k": 1,
    "attn.v": 1,
    "attn.pattern": 2,
    "attn.z": 1,
    "attn.out": 1,
    "resid.mid": 1,
    "mlp.in": 1,
    "mlp.hidden": 0,
    "mlp.out": 1,
    "resid.post": 1,
}

# The site each projection of a layer reads (its input), keyed by the params path below the layer:
# what Wanda's and SparseGPT's statistics are computed from.
PROJECTION_INPUT = {
    "self_attn/q_proj": "attn.in",
    "self_attn/k_proj": "attn.in",
    "self_attn/v_proj": "attn.in",
    "self_attn/o_proj": "attn.z",
    "mlp/gate_proj": "mlp.in",
    "mlp/up_proj": "mlp.in",
    "mlp/down_proj": "mlp.hidden",
}


def check_sites(names) -> tuple[str, ...]:
    """names as a tuple, or a ValueError naming the unknown one and listing the known sites."""
    names = tuple(names)
    for n in names:
        if n not in SITES:
            raise ValueError(f"unknown site {n!r}: use one of {', '.join(SITES)}")
    return names


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Edit:
    """v' = keep * v + (1 - keep) * replace + add at one site (module docstring); None = not used."""

    keep: Any = None
    replace: Any = None
    add: Any = None

    def apply(self, value: Array, event_ndim: int, rows: Array | None = None) -> Array:
        """The edited value. With rows [R] (the value is [1, R, ...], flat positions of B * T),
        per-position parts ([B, T, ...]) are gathered at those rows; constant parts broadcast."""
        dtype = value.dtype
        if self.keep is not None:
            keep = _at_rows(jnp.asarray(self.keep, dtype), value.ndim - event_ndim, rows)
            keep = keep.reshape(keep.shape + (1,) * event_ndim)
            value = keep * value
            if self.replace is not None:
                value = value + (1 - keep) * _at_rows(jnp.asarray(self.replace), value.ndim, rows).astype(dtype)
        elif self.replace is not None:  # keep absent: fully replaced
            value = jnp.broadcast_to(_at_rows(jnp.asarray(self.replace), value.ndim, rows).astype(dtype), value.shape)
        if self.add is not None:
            value = value + _at_rows(jnp.asarray(self.add), value.ndim, rows).astype(dtype)
        return value


def _at_rows(a: Array, full_ndim: int, rows: Array | None) -> Array:
    """A per-position array [B, T, ...] (ndim == full_ndim) gathered at flat rows [R] -> [1, R, ...];
    anything with fewer dims is constant over positions and returned as is (it broadcasts)."""
    if rows is None or a.ndim < full_ndim:
        return a
    return a.reshape(-1, *a.shape[2:])[rows][None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Interventions:
    """edits {site: Edit} (array leaves; traced), capture: the sites whose values are kept (static).

    The one argument that carries every intervention through `Decoder`, `DecoderLayer` and
    `Attention`; a pytree, so it can be vmapped (a batch of interventions) and jitted."""

    edits: dict = dataclasses.field(default_factory=dict)
    capture: frozenset = dataclasses.field(default=frozenset(), metadata=dict(static=True))

    def __post_init__(self):
        check_sites(self.edits)
        check_sites(self.capture)
        object.__setattr__(self, "capture", frozenset(self.capture))

    def at(self, layer) -> Interventions:
        """One layer's slice of interventions stacked over layers (every leaf [L, ...])."""
        return jax.tree.map(lambda a: a[layer], self)

    def with_edit(self, site: str, edit: Edit | None) -> Interventions:
        edits = {k: v for k, v in self.edits.items() if k != site}
        if edit is not None:
            edits[site] = edit
        return Interventions(edits, self.capture)


def with_head_mask(iv: Interventions | None, head_mask: Array | None) -> Interventions | None:
    """iv with head_mask ([H], or [L, H] for stacked interventions) multiplied into attn.z's keep:
    the head mask is an intervention on attn.z. None leaves iv as it is (no operation added)."""
    if head_mask is None:
        return iv
    iv = iv or Interventions()
    edit = iv.edits.get("attn.z") or Edit()
    keep = head_mask if edit.keep is None else head_mask * edit.keep
    return iv.with_edit("attn.z", dataclasses.replace(edit, keep=keep))


def touches(iv: Interventions | None, site: str) -> bool:
    """Whether iv edits or captures the site (else it costs nothing)."""
    return iv is not None and (site in iv.edits or site in iv.capture)


def at_site(module, iv: Interventions | None, site: str, value: Array, rows: Array | None = None) -> Array:
    """Applies iv's edit of `site` to value and sows the result into the "sites" collection when
    captured (read back by `capjax.cache.run_with_cache`); the value unchanged when nothing touches it."""
    if iv is None:
        return value
    edit = iv.edits.get(site)
    if edit is not None:
        value = edit.apply(value, KEEP_EVENT_NDIM[site], rows)
    if site in iv.capture:
        module.sow("sites", site, value)
    return value


def collect_sites(tree) -> dict[str, Array]:
    """{site: value} from the "sites" collection: one layer's values from a `DecoderLayer`, or
    [L, ...] from `Decoder` (which sows the values `scan_layers` stacked over layers)."""
    out = {}

    def walk(node):
        for key, value in node.items():
            if key in SITES:
                out[key] = value[0]
            elif isinstance(value, dict):
                walk(value)

    walk(tree)
    return out


__all__ = [
    "Edit",
    "Interventions",
    "KEEP_EVENT_NDIM",
    "PROJECTION_INPUT",
    "SITES",
    "at_site",
    "check_sites",
    "collect_sites",
    "touches",
    "with_head_mask",
]
