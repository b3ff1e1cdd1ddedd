"""Several JAX processes as one job: initialisation from the environment, host-side helpers.

A TPU pod slice, a multi-node GPU job or `scripts/launch_local.sh N` on one machine runs the
same script once per process; each process sees only its local devices, `jax.devices()` lists
all of them, and an array sharded over a mesh of all devices is held by no single host. This
module holds what the library needs on top of JAX's own runtime:

    initialize()      jax.distributed.initialize() from env vars (CAPJAX_*, JAX_*, torchrun's,
                      Slurm's), gloo for CPU collectives, heartbeat / init timeouts so that a
                      dead peer fails the job instead of hanging it.
    to_host(tree)     numpy copies of (possibly globally sharded) arrays, identical on every
                      process (np.asarray fails on an array with non-addressable shards).
    is_writer()       True on process 0 only: the one that writes results files.
    process_rows(n)   this process's contiguous share of n examples; gather_rows() joins the
                      shares back, in order, on every process.
    place_batch()     host batches padded with masked rows and split over "data" when params
                      sit on a mesh (batch_multiple() gives the multiple).
    exists(path)      process 0's answer, on every process: reuse-or-compute is decided once.
    restore_numpy()   an orbax checkpoint as numpy on every process, whatever its shardings.
    checksum(x)       a params fingerprint that does not depend on the layout.

Legend: B rows (examples), W processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.mesh import DATA, axis_size, batch_sharding

ENABLE = "CAPJAX_DISTRIBUTED"
TRUE = ("1", "true", "yes", "on")
# Each setting: the variables read, first set wins. torchrun sets MASTER_ADDR / MASTER_PORT /
# WORLD_SIZE / RANK; Slurm sets SLURM_NTASKS / SLURM_PROCID (JAX's own Slurm detection also
# finds the coordinator from SLURM_STEP_NODELIST when no address is given).
ADDRESS_VARS = ("CAPJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
COUNT_VARS = ("CAPJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES", "JAX_PROCESS_COUNT", "WORLD_SIZE", "SLURM_NTASKS")
ID_VARS = ("CAPJAX_PROCESS_ID", "JAX_PROCESS_ID", "RANK", "SLURM_PROCID")
HEARTBEAT_VAR, INIT_TIMEOUT_VAR = "CAPJAX_HEARTBEAT_TIMEOUT", "CAPJAX_INIT_TIMEOUT"
DEFAULT_HEARTBEAT_S, DEFAULT_INIT_TIMEOUT_S = 100, 300  # JAX's defaults


class DistributedConfigError(ValueError):
    """A distributed setting in the environment is malformed or inconsistent."""


@dataclass(frozen=True)
class DistributedSettings:
    """Arguments for `jax.distributed.initialize`; None leaves a value to JAX's cluster detection."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_S
    init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "initialization_timeout": self.init_timeout_s,
            "heartbeat_timeout_seconds": self.heartbeat_timeout_s,
        }
        for k in ("coordinator_address", "num_processes", "process_id"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def _first(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    for n in names:
        if env.get(n, "").strip():
            return n, env[n].strip()
    return None


def _int(env: Mapping[str, str], names: Sequence[str], minimum: int) -> int | None:
    hit = _first(env, names)
    if hit is None:
        return None
    name, value = hit
    try:
        out = int(value)
    except ValueError:
        raise DistributedConfigError(f"{name}={value!r}: expected an integer >= {minimum}") from None
    if out < minimum:
        raise DistributedConfigError(f"{name}={value!r}: expected an integer >= {minimum}")
    return out


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether CAPJAX_DISTRIBUTED asks for a multi-process run."""
    return (os.environ if env is None else env).get(ENABLE, "").strip().lower() in TRUE


def settings_from_env(env: Mapping[str, str] | None = None) -> DistributedSettings:
    """The settings the environment gives (see ADDRESS_VARS, COUNT_VARS, ID_VARS).

    torchrun-style MASTER_ADDR + MASTER_PORT make the address when no *_COORDINATOR_ADDRESS is
    set. Raises DistributedConfigError naming the variable when a value is malformed, or when
    the process id is not below the process count.
    """
    env = os.environ if env is None else env
    address = _first(env, ADDRESS_VARS)
    addr = address[1] if address else None
    if addr is None and env.get("MASTER_ADDR", "").strip() and env.get("MASTER_PORT", "").strip():
        addr = f"{env['MASTER_ADDR'].strip()}:{env['MASTER_PORT'].strip()}"
    if addr is not None and not addr.rpartition(":")[2].isdigit():
        name = address[0] if address else "MASTER_ADDR/MASTER_PORT"
        raise DistributedConfigError(f"{name}={addr!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
    n = _int(env, COUNT_VARS, 1)
    i = _int(env, ID_VARS, 0)
    if n is not None and i is not None and i >= n:
        id_var, count_var = _first(env, ID_VARS), _first(env, COUNT_VARS)
        assert id_var is not None and count_var is not None  # both were read above
        raise DistributedConfigError(
            f"process id {i} ({id_var[0]}) must be below the process count {n} ({count_var[0]})"
        )
    return DistributedSettings(
        addr,
        n,
        i,
        _int(env, (HEARTBEAT_VAR,), 1) or DEFAULT_HEARTBEAT_S,
        _int(env, (INIT_TIMEOUT_VAR,), 1) or DEFAULT_INIT_TIMEOUT_S,
    )


def initialize(settings: DistributedSettings | None = None, force: bool = False) -> bool:
    """Starts JAX's distributed runtime when CAPJAX_DISTRIBUTED=1 (or `force`); returns whether it
    is initialized. Must run before any other JAX call (the CLI calls it first thing).

    CPU collectives use gloo (over TCP; the setting only concerns the CPU client, so it is harmless
    on GPU / TPU hosts). A process that stops heart-beating for `heartbeat_timeout_s` is declared
    dead and JAX's coordination service then terminates the other processes, so a killed peer
    fails the job within about that time instead of hanging it in a collective.
    """
    if jax.distributed.is_initialized():
        return True
    if not (force or enabled()):
        return False
    settings = settings_from_env() if settings is None else settings
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not os.environ.get("JAX_ENABLE_PREEMPTION_SERVICE"):
        # JAX's preemption notifier would catch SIGTERM and keep the process running (capjax
        # saves no preemption checkpoints; it resumes from its regular ones), so a launcher or
        # scheduler could not stop it: SIGTERM keeps its default effect.
        jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**settings.kwargs())
    return True


# ---------------------------------------------------------------------------- host side
def is_writer() -> bool:
    """True on the process that writes results files (process 0); every process when single."""
    return jax.process_index() == 0


def _to_host(x: Any) -> Any:
    if not isinstance(x, jax.Array):
        return x
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree: Any) -> Any:
    """Every jax.Array leaf of `tree` as a numpy array with its global value, on every process.

    A globally sharded array is all-gathered across processes (a collective: every process must
    call this for the same arrays in the same order); local or replicated ones are copied as is.
    """
    return jax.tree.map(_to_host, tree)


def _batch_mesh(params: Any) -> Any:
    """The mesh batches are split over: that of params' first array when it is a NamedSharding
    with a "data" axis of size > 1, else None."""
    from jax.sharding import NamedSharding

    leaf = next((x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)), None)
    sh = getattr(leaf, "sharding", None)
    if not isinstance(sh, NamedSharding) or axis_size(sh.mesh, DATA) == 1:
        return None
    return sh.mesh


def batch_multiple(params: Any) -> int:
    """The row count `place_batch` pads a batch to a multiple of: the "data" axis size of the
    mesh params sit on, 1 when batches are not split."""
    mesh = _batch_mesh(params)
    return 1 if mesh is None else axis_size(mesh, DATA)


def place_batch(params: Any, *arrays: Any) -> tuple[jax.Array, ...]:
    """`arrays` (host [B, ...], the same on every process) as inputs of a jitted call on `params`.

    When params are sharded over a mesh with a "data" axis (d = its size > 1), each array's
    batch axis B is padded with rows of zeros (token 0, attention mask 0: masked rows) to a
    multiple of d and split over "data": every device, hence every process, computes its share
    of the examples, whatever B (batch size 1 included). The outputs have the padded batch
    [B + (-B % d), ...]; callers keep their first B rows (after `to_host`). Otherwise the arrays
    are plain device arrays, unchanged.
    """
    mesh = _batch_mesh(params)
    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    d = axis_size(mesh, DATA)
    out = []
    for a in arrays:
        a = np.asarray(a)
        a = np.concatenate([a, np.zeros((-len(a) % d, *a.shape[1:]), a.dtype)])
        out.append(jax.device_put(a, batch_sharding(mesh, a.shape)))
    return tuple(out)


def process_rows(n: int, index: int | None = None, count: int | None = None) -> slice:
    """The contiguous rows [start, stop) of n that process `index` of `count` handles (default:
    this process of all); earlier processes take one extra row when n does not divide."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """local [n_p, ...] (this process's `process_rows(n)` rows) -> [B = n, ...] on every process.

    Shares are padded to the largest one for the exchange (a collective over processes).
    """
    count = jax.process_count()
    local = np.asarray(local)
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    width = process_rows(n, 0, count).stop  # process 0 has the largest share
    pad = np.zeros((width - local.shape[0], *local.shape[1:]), local.dtype)
    stacked = np.asarray(multihost_utils.process_allgather(np.concatenate([local, pad])))  # [W, width, ...]
    return np.concatenate([stacked[p, : len(range(n)[process_rows(n, p, count)])] for p in range(count)])


def process0_says(flag: bool) -> bool:
    """Process 0's `flag`, on every process: a decision to reuse or to compute must be the same
    everywhere, or the processes would run different collectives."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def exists(path: str | os.PathLike) -> bool:
    """Whether `path` exists, as process 0 sees it, on every process (`process0_says`)."""
    return process0_says(os.path.exists(path))


def restore_numpy(path: str | os.PathLike) -> Any:
    """A checkpoint step folder of `capjax.checkpoints` (e.g. checkpoints/scores/<fp>/layers_0000)
    restored as host numpy arrays on every process, whatever shardings (and device ids) it was
    saved with; every process reads the whole step."""
    from capjax.checkpoints import restore_numpy as restore

    return restore(Path(path))


@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    mixed = (bits * jnp.uint32(2654435761)) ^ (bits >> 13)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


def checksum(x: Any) -> np.ndarray:
    """Two uint32 sums (mod 2^32) of the float32 bit patterns of `x`: the same for any sharding,
    mesh or process count (integer addition does not depend on the reduction order, unlike a
    float sum), so a checkpoint fingerprint built from it survives a change of layout."""
    return to_host(_checksum(x))


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = [
    "DistributedConfigError",
    "DistributedSettings",
    "barrier",
    "batch_multiple",
    "checksum",
    "enabled",
    "exists",
    "gather_rows",
    "initialize",
    "is_writer",
    "place_batch",
    "process0_says",
    "process_rows",
    "restore_numpy",
    "settings_from_env",
    "to_host",
]
