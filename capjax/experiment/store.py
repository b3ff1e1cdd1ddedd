"""A content-keyed artifact store: every reused result is filed under the fingerprint of what
produced it, written atomically, and checked when read back.

    <out>/artifacts/scores/<fp>.npz      head scores: per-subset and per-example losses
    <out>/artifacts/masks/<fp>.npz       weight masks (and the kept weights a method changed)
    <out>/artifacts/evals/<fp>.json      one evaluation: metrics and per-example values
    <out>/artifacts/recovery/<fp>.json   one recovery run's loss history
    <out>/artifacts/digests.json         file digests, keyed by path, size and mtime

A fingerprint is the SHA-256 of the canonical JSON of the inputs (sorted keys), so changing any
setting back and forth finds each earlier result again and never uses one computed from other
inputs. A file that is missing, truncated or garbage is reported in one line and recomputed.
Every artifact also records the capjax code that computed it (`capjax.provenance.code_version`):
code is not part of the fingerprint, so a result is reused across capjax versions and commits,
but `code_of` lets the caller say so (and `Store(read=False)` recomputes everything).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

# The file helpers live in `capjax.artifacts` (the floor below every layer); the names stay importable here.
from capjax.artifacts import (  # noqa: F401
    _json_default,
    atomic_write,
    file_digest,
    file_mode,
    fingerprint,
    read_npz,
    strict_json,
    umask,
    warn,
    write_text,
    write_texts,
)
from capjax.errors import ArtifactError
from capjax.provenance import code_version

SUFFIXES = {"scores": ".npz", "masks": ".npz", "evals": ".json", "recovery": ".json"}  # artifact kind -> file


def agreed(found: bool, what: Path) -> bool:
    """Process 0's answer on every process (reuse or recompute must be decided the same way
    everywhere, or the processes would run different collectives)."""
    import jax

    from capjax.distributed import process0_says

    decided = process0_says(found)
    if decided and not found:
        raise ArtifactError(
            f"process {jax.process_index()} cannot read {what}, which process 0 reuses: "
            "the results folder must be on a filesystem every process shares"
        )
    return decided


class Store:
    """Artifacts of one results folder, by kind and fingerprint. `load_*` returns None when the
    artifact is absent, and also (after one warning line) when it is unreadable or was filed
    under another fingerprint; the caller then recomputes and saves it. With several processes,
    process 0 decides for all, and only the writer process writes."""

    def __init__(self, out: str | os.PathLike, writer: bool = True, read: bool = True):
        self.root = Path(out) / "artifacts"
        self.writer = writer  # multi-process runs: only one process writes
        self.read = read  # False: every load_* finds nothing, so everything is recomputed (and rewritten)
        self._digests: dict[str, str] | None = None

    @staticmethod
    def code_of(saved: dict) -> str | None:
        """The capjax code version that computed a loaded artifact (None: written before capjax
        recorded it)."""
        meta = saved.get("meta")
        if isinstance(meta, np.ndarray):
            return json.loads(str(meta)).get("code")
        return saved.get("code")

    def path(self, kind: str, fp: str) -> Path:
        return self.root / kind / f"{fp}{SUFFIXES[kind]}"

    # ---------------------------------------------------------------- file digests
    def digest(self, path: Path) -> str:
        cache_file = self.root / "digests.json"
        if self._digests is None:
            try:
                self._digests = json.loads(cache_file.read_text()) if cache_file.exists() else {}
                if not isinstance(self._digests, dict):
                    raise ValueError("not a mapping")
            except (ValueError, OSError):
                warn(f"{cache_file} is unreadable; digests are recomputed")
                self._digests = {}
        n = len(self._digests)
        d = file_digest(path, self._digests)
        if len(self._digests) != n and self.writer:
            write_text(cache_file, json.dumps(self._digests, indent=1))
        return d

    # ---------------------------------------------------------------- json
    def load_json(self, kind: str, fp: str, required: tuple[str, ...] = ()) -> dict | None:
        data = self._load_json(kind, fp, required)
        return data if agreed(data is not None, self.path(kind, fp)) else None

    def _load_json(self, kind: str, fp: str, required: tuple[str, ...]) -> dict | None:
        path = self.path(kind, fp)
        if not self.read or not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("fingerprint") != fp:
                raise ValueError(f"filed under {fp} but says fingerprint {data.get('fingerprint')!r}")
            missing = [k for k in required if not data.get(k)]
            if missing:
                raise ValueError(f"empty or missing {', '.join(missing)}")
        except (ValueError, OSError, UnicodeDecodeError) as e:
            warn(f"{path} is unreadable ({type(e).__name__}: {e}); recomputing it")
            return None
        return data

    def save_json(self, kind: str, fp: str, data: dict) -> Path:
        path = self.path(kind, fp)
        if self.writer:
            write_text(path, strict_json({**data, "fingerprint": fp, "code": code_version()}))
        return path

    # ---------------------------------------------------------------- npz
    def load_npz(self, kind: str, fp: str, required: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
        arrays = self._load_npz(kind, fp, required)
        return arrays if agreed(arrays is not None, self.path(kind, fp)) else None

    def _load_npz(self, kind: str, fp: str, required: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        path = self.path(kind, fp)
        if not self.read or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays.get("meta", "{}")))
            if meta.get("fingerprint") != fp:
                raise ValueError(f"filed under {fp} but says fingerprint {meta.get('fingerprint')!r}")
            missing = [k for k in required if k not in arrays]
            if missing:
                raise ValueError(f"missing arrays {', '.join(missing)}")
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            warn(f"{path} is unreadable ({type(e).__name__}: {e}); recomputing it")
            return None
        return arrays

    def save_npz(self, kind: str, fp: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> Path:
        path = self.path(kind, fp)
        if self.writer:
            payload = {
                **arrays,
                "meta": np.asarray(
                    json.dumps({**(meta or {}), "fingerprint": fp, "code": code_version()}, default=_json_default)
                ),
            }
            atomic_write(path, lambda f: np.savez(f, **payload))  # type: ignore[arg-type]  # numpy's stub
        return path
