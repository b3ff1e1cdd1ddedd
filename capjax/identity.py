"""Which model a result belongs to: a cheap identity of a model's files, recorded with head scores
(`capjax score`) and pruned exports (`capjax prune`) and compared before they are used on a model.

    model_identity(source)  20 hex digits over config.json's bytes and a sample of each weight file

A weight file is sampled, not read whole: its size, its first MiB (a safetensors / GGUF header
names every tensor with its shape, dtype and offset) and 16 blocks of 64 KiB spread evenly over
it, so the identity costs a few MiB of reads for any model size. Two checkpoints with other
weights (another seed, a fine-tune, a pruning of the same architecture) differ in every sampled
block; two that differ in only a few weights outside the samples are not told apart. The same
weights saved another way (another dtype, other shards, GGUF against safetensors) are another
identity.
"""

from __future__ import annotations

import os
from pathlib import Path

from capjax.artifacts import Digest

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
HEAD_BYTES = 1 << 20
BLOCKS = 16
BLOCK_BYTES = 1 << 16


def sampled_digest(path: Path) -> str:
    """SHA-256 over a file's size, first HEAD_BYTES and BLOCKS evenly spread BLOCK_BYTES blocks."""
    size = path.stat().st_size
    d = Digest().text(str(size))
    with path.open("rb") as f:
        d.raw(f.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            for i in range(BLOCKS):
                f.seek(HEAD_BYTES + (size - HEAD_BYTES - BLOCK_BYTES) * i // max(1, BLOCKS - 1))
                d.raw(f.read(BLOCK_BYTES))
    return d.hex(64)


def model_identity(source: str | os.PathLike) -> str:
    """The identity of the model `source` names (HF folder, .gguf, hub id, smollm2-135m-instruct):
    20 hex digits over its config.json and weight files (names and sampled contents)."""
    from capjax.io import model_files

    d = Digest()
    files = [p for p in model_files(source) if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"{source}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to identify the model by")
    for p in files:
        d.text(p.name).text(sampled_digest(p))
    return d.hex(20)
