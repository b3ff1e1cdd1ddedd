"""Device meshes, parameter sharding rules and data-parallel ablation batches.

Legend (see `capjax.model`): L layers, E hidden, H query heads, K kv heads, D head dim,
F MLP width, V vocab, N a batch of ablation masks.

Two logical mesh axes:

    "data"   FSDP: every large kernel is split along its hidden axis E; batches of ablation
             masks (and Wanda/SparseGPT calibration chunks) are split along their batch axis.
    "model"  tensor parallelism: attention kernels split over heads (H or K), MLP kernels over
             the width F, the vocabulary over V.

`DEFAULT_RULES` maps '/'-joined parameter paths (regex, first match wins) to PartitionSpecs.
A spec entry is dropped (that dim replicated) when the mesh lacks the axis or the dim is not
divisible by the axis size, so one rule table serves any mesh and any model: on a
{"data": 8} mesh with E = 4096 the kernels are FSDP-only; with V = 101 the vocab stays whole.
Masks returned by `capjax.prune` have the params' tree (None at unpruned leaves) and get the
same shardings via `shard_params(masks, mesh)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from capjax.families import DEFAULT, Family
from capjax.mesh import DATA, MODEL, axis_size, batch_sharding, fit_spec

Params = dict[str, Any]
Rules = Sequence[tuple[str, P]]


def family_rules(family: Family) -> Rules:
    """A family's sharding rules (`Family.sharding`) as (regex, PartitionSpec) pairs."""
    return tuple((pattern, P(*spec)) for pattern, spec in family.sharding)


# The default family's rules; every family so far shares them (norms and biases it adds fall
# through to the replicated catch-all).
DEFAULT_RULES: Rules = family_rules(DEFAULT)


# ---------------------------------------------------------------------------- meshes
def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A device mesh, e.g. make_mesh({"data": -1, "model": 2}).

    shape: axis name -> size, in mesh order; at most one size may be -1 (fills the rest).
        Default {"data": -1}: plain data parallelism / FSDP over every device.
    devices: the devices to use (default `jax.devices()`, all processes). When the sizes'
        product divides but is smaller than their number, the first ones are used.
    Raises ValueError when the product does not divide the device count.
    """
    shape = dict(shape or {DATA: -1})
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh shape {shape}: only one axis may be -1, got {free}")
    bad = {k: v for k, v in shape.items() if v != -1 and (not isinstance(v, (int, np.integer)) or v < 1)}
    if bad:
        raise ValueError(f"mesh shape {shape}: sizes must be positive integers or -1, got {bad}")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if n % fixed:
        raise ValueError(
            f"mesh shape {shape}: the product of the fixed sizes ({fixed}) does not divide the device count ({n})"
        )
    if free:
        shape[free[0]] = n // fixed
    used = math.prod(shape.values())
    return jax.make_mesh(
        tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape), devices=devices[:used]
    )


# ---------------------------------------------------------------------------- params
def _path_name(path: Iterable[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The PartitionSpec of the leaf at path `name` ('/'-joined): first matching rule, fitted."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            if len(spec) > len(shape):  # a stacked [L, ...] rule applied to one layer's slice
                spec = P(*list(spec)[len(spec) - len(shape) :])
            return fit_spec(spec, shape, mesh)
    return P()


def param_shardings(params: Params, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Params:
    """A tree like `params` of NamedShardings (None leaves stay None; works on ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(_path_name(path), np.shape(x), mesh, rules)), params
    )


def leaf_placer(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Callable[[tuple[str, ...], Any], jax.Array]:
    """place(path, array): one param leaf (path as key tuple) put on `mesh` by `rules`, as
    `shard_params` would place it (`capjax.convert.params_from_tensors` streams leaves through it)."""

    def place(path: tuple[str, ...], a: Any) -> jax.Array:
        sharding = NamedSharding(mesh, spec_for("/".join(path), np.shape(a), mesh, rules))
        # Each process supplies the shards of its own devices (device_put refuses a host array
        # for a sharding with other processes' devices).
        return jax.make_array_from_callback(np.shape(a), sharding, lambda index: a[index])

    return place


def shard_params(params: Params, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Params:
    """`params` (or masks with None leaves, or any tree with the params' paths) placed on `mesh`
    by `rules`. Arrays already laid out that way are not copied."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh, axis: int = 0, mesh_axis: str = DATA) -> Any:
    """Every array of `tree` with its dim `axis` split over `mesh_axis` where divisible."""
    return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, np.shape(a), axis, mesh_axis)), tree)


def pad_to_multiple(x: np.ndarray | jax.Array, multiple: int, fill_row: int = 0):
    """x [N, ...] padded to a multiple of `multiple` rows with copies of row `fill_row`; (x, N)."""
    n = x.shape[0]
    pad = -n % multiple
    if pad == 0:
        return x, n
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.concatenate([x, xp.repeat(x[fill_row : fill_row + 1], pad, axis=0)]), n


# ---------------------------------------------------------------------------- inside jit
def constrain_replicated(x: Any, mesh: Mesh | None) -> Any:
    """Sharding constraint: `x` replicated over the mesh (under `sharded_map`'s vmap the batch
    axis is added back on "data"). Identity when mesh is None."""
    if mesh is None:
        return x
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P())), x)


def sharded_map(f: Callable, xs: jax.Array, batch_size: int, mesh: Mesh, axis: str = DATA) -> Any:
    """`jax.lax.map(f, xs, batch_size=...)` with each step's batch split over a mesh axis.

    xs [N, ...] -> f's outputs stacked [N, ...]. Every step runs `vmap(f)` on d * c rows (d the
    axis size, c <= batch_size rows per device), constrained to be split over `axis`, so d
    devices evaluate d times as many rows per step. N is padded (copies of row 0, dropped
    afterwards) to a whole number of steps; c is chosen to keep the padding below d * steps.
    For use inside jit.
    """
    n = xs.shape[0]
    d = axis_size(mesh, axis)
    steps = max(1, -(-n // (d * max(1, batch_size))))
    c = max(1, -(-n // (d * steps)))
    xs, _ = pad_to_multiple(xs, d * c * steps)
    xs = xs.reshape(steps, d * c, *xs.shape[1:])
    name = axis if axis in mesh.axis_names else None
    split = NamedSharding(mesh, P(name))

    def step(batch):
        batch = jax.lax.with_sharding_constraint(batch, split)
        out = jax.vmap(f, spmd_axis_name=name)(batch)
        return jax.tree.map(lambda o: jax.lax.with_sharding_constraint(o, split), out)

    out = jax.lax.map(step, xs)
    return jax.tree.map(lambda o: o.reshape(steps * d * c, *o.shape[2:])[:n], out)


# ---------------------------------------------------------------------------- init
def init_params_sharded(
    config: Any, mesh: Mesh | None = None, dtype: Any = jnp.bfloat16, seed: int = 0, rules: Rules = DEFAULT_RULES
) -> Params:
    """Random params (normal 0.02 kernels and embedding, norms 1, biases 0) created directly in
    `dtype` and directly sharded (one jitted call with out_shardings: no float32 or host copy).

    Same layout and distribution as `capjax.model.init_params`, not the same values.
    """
    from capjax.model import param_shapes

    shapes = param_shapes(config)
    names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    leaves, treedef = jax.tree.flatten(shapes)

    def init():
        key = jax.random.PRNGKey(seed)
        out = []
        for i, (name, s) in enumerate(zip(names, leaves)):
            if name.endswith("scale"):
                out.append(jnp.ones(s.shape, dtype))
            elif name.endswith("bias"):
                out.append(jnp.zeros(s.shape, dtype))
            else:
                out.append(jax.random.normal(jax.random.fold_in(key, i), s.shape, dtype) * 0.02)
        return jax.tree.unflatten(treedef, out)

    out_shardings = None if mesh is None else param_shardings(shapes, mesh, rules)
    return jax.jit(init, out_shardings=out_shardings)()


# ---------------------------------------------------------------------------- multi-host
def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when env CAPJAX_DISTRIBUTED=1; returns whether the
    distributed runtime is (now) initialized. Call it before any other JAX work.

    The settings come from the environment (`capjax.distributed.settings_from_env`: CAPJAX_*,
    JAX_*, torchrun's MASTER_ADDR / WORLD_SIZE / RANK, Slurm's SLURM_NTASKS / SLURM_PROCID);
    what is not set is left to JAX's own cluster detection (Slurm, Open MPI, Cloud TPU, ...).
    """
    from capjax.distributed import initialize

    return initialize()


__all__ = [
    "DATA",
    "DEFAULT_RULES",
    "MODEL",
    "axis_size",
    "batch_sharding",
    "constrain_replicated",
    "family_rules",
    "fit_spec",
    "init_params_sharded",
    "leaf_placer",
    "make_mesh",
    "maybe_initialize_distributed",
    "pad_to_multiple",
    "param_shardings",
    "replicated",
    "shard_batch",
    "shard_params",
    "sharded_map",
    "spec_for",
]
