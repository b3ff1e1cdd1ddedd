"""Mesh axes and the specs that fit them: the part of `capjax.sharding` that `capjax.distributed`
needs too, below both (sharding builds meshes and parameter rules on top of it; distributed
places host batches with it).

    DATA, MODEL        the two logical axis names ("data": FSDP and batches, "model": tensor parallel)
    axis_size()        a mesh axis' size, 1 when the mesh lacks it
    fit_spec()         a PartitionSpec with the entries dropped that the mesh or the shape cannot take
    batch_sharding()   an array's batch axis split over "data"
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from capjax.families.base import DATA, MODEL

__all__ = ["DATA", "MODEL", "axis_size", "batch_sharding", "fit_spec"]


def axis_size(mesh: Mesh | AbstractMesh, axis: str | None) -> int:
    """Size of a mesh axis; 1 when the mesh has no such axis."""
    return int(mesh.shape[axis]) if axis is not None and axis in mesh.axis_names else 1


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` with every entry dropped whose mesh axis is absent or does not divide the dim."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if len(entries) > len(shape):
        raise ValueError(f"partition spec {spec} has more entries than the array has dims {tuple(shape)}")
    out = []
    for dim, entry in zip(shape, entries):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if a in mesh.axis_names)
        size = math.prod(mesh.shape[a] for a in axes)
        out.append(None if not axes or dim % size else (axes[0] if len(axes) == 1 else axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def batch_sharding(mesh: Mesh, shape: Sequence[int], axis: int = 0, mesh_axis: str = DATA) -> NamedSharding:
    """Splits dim `axis` of an array of `shape` over `mesh_axis` (replicated when not divisible)."""
    spec: list[str | None] = [None] * len(shape)
    spec[axis] = mesh_axis
    return NamedSharding(mesh, fit_spec(P(*spec), shape, mesh))
