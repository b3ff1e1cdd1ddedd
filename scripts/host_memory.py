"""Host memory of loading and sharding a checkpoint, per process (docs/scale_out.md, "Memory per host").

    python scripts/host_memory.py [--model smollm2-135m-instruct] [--dtype float32] [--streamed]
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/host_memory.py
    python -m capjax.launch 2 --devices 2 -- python scripts/host_memory.py

Each process loads the whole checkpoint (`load_pretrained`), places it on a {"data": -1} mesh of
all global devices (`shard_params`), drops the host copy, and reports the peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) before reading any tensor (transformers imported,
config read), after loading, and after sharding, the current RSS (VmRSS) at the end, and the bytes
of the params its own devices
hold. With --streamed it loads as `capjax run` does with a mesh, `load_pretrained(mesh=)`:
each param placed as soon as it is read (so "after load" is also "after sharding"). Peak RSS
cannot be reset, so compare the two ways in separate runs. Process 0 prints one line per
process, plus the checkpoint's file size and the params' total bytes.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from capjax import distributed

MIB = 2**20


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """Current resident set size in bytes (VmRSS), 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--streamed", action="store_true", help="load_pretrained(mesh=): place each param as read")
    args = parser.parse_args()
    distributed.initialize()

    import jax
    import numpy as np

    import capjax
    from capjax.io import SMOLLM2, smollm2_gguf_path
    from capjax.sharding import make_mesh, shard_params

    mesh = make_mesh({"data": -1})
    capjax.load_config(args.model)  # imports transformers (and gguf): "before" is before any tensor is read
    before = peak_rss()
    if args.streamed:
        model, sharded = capjax.load_pretrained(args.model, dtype=args.dtype, mesh=mesh)
        jax.block_until_ready(sharded)
        loaded = placed = peak_rss()
    else:
        model, params = capjax.load_pretrained(args.model, dtype=args.dtype)
        loaded = peak_rss()
        sharded = shard_params(params, mesh)
        jax.block_until_ready(sharded)
        del params
        gc.collect()
        placed = peak_rss()
    total = sum(x.nbytes for x in jax.tree.leaves(sharded))
    local = sum(s.data.nbytes for x in jax.tree.leaves(sharded) for s in x.addressable_shards)
    row = np.asarray([before, loaded, placed, current_rss(), local], np.int64)
    rows = np.asarray(distributed.gather_rows(row[None], jax.process_count()))  # [P, 5]
    if not distributed.is_writer():
        return
    where = str(smollm2_gguf_path() if args.model == SMOLLM2 else args.model)
    kind = "gguf" if where.endswith(".gguf") else "safetensors"
    size = (
        os.path.getsize(where)
        if os.path.isfile(where)
        else sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(where)
            for f in fs
            if f.endswith((".safetensors", ".gguf"))
        )
    )
    print(
        f"# {args.model} ({kind}, {size / MIB:.1f} MiB on disk), params {total / MIB:.1f} MiB in {args.dtype}; "
        f"{jax.process_count()} process(es) x {jax.local_device_count()} device(s), mesh {dict(mesh.shape)}, "
        f"{'streamed (load_pretrained(mesh=))' if args.streamed else 'load_pretrained, then shard_params'}"
    )
    print("process  peak RSS before load  after load  after sharding  RSS at end  params on its devices (MiB)")
    for i, r in enumerate(rows):
        print(
            f"{i:7d}  {r[0] / MIB:20.1f}  {r[1] / MIB:10.1f}  {r[2] / MIB:14.1f}  {r[3] / MIB:10.1f}  "
            f"{r[4] / MIB:10.1f}"
        )


if __name__ == "__main__":
    main()
