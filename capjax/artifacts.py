"""Artifact files, the floor every layer that writes or reads results stands on: atomic writes
(a reader sees the old file or the whole new one), checked reads of .npz / JSON files (one
error naming the file), JSON that refuses NaN, fingerprints, and the file formats of head scores
and keep masks. It imports numpy and the standard library only (no jax), and of capjax only
`capjax.errors`; the results folder's content-keyed store (`capjax.experiment.store`) is built on it.

Fingerprints, one family: `Digest` is an incremental SHA-256 (text, canonical JSON, array bytes,
raw bytes); `fingerprint(inputs)` is that of the canonical JSON of a settings tree,
`array_digest(*arrays)` that of arrays (dtype, shape and bytes), `file_digest(path)` that of a
file's bytes, `masks_digest(flat, names)` that of keep masks (shapes and bits).

Legend: L layers, H heads, U calibration subsets, B calibration examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from capjax.errors import ArtifactError


class Digest:
    """An incremental SHA-256 fingerprint. Each method feeds one item and returns the Digest, so
    `Digest().json(settings).array(tokens).hex(16)` reads in order; the same items fed in the
    same order give the same digest in every process and session."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def raw(self, data: bytes) -> Digest:
        self._h.update(data)
        return self

    def text(self, text: str) -> Digest:
        return self.raw(text.encode())

    def json(self, obj: Any) -> Digest:
        """The canonical JSON of `obj` (sorted keys, no spaces; numpy scalars and arrays, tuples and paths allowed)."""
        return self.text(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default))

    def array(self, a: Any, layout: bool = True) -> Digest:
        """The bytes of `a` (C order), preceded by its dtype and shape when `layout`."""
        a = np.ascontiguousarray(np.asarray(a))
        if layout:
            self.text(f"{a.dtype}{a.shape}")
        return self.raw(a.tobytes())

    def digest(self) -> bytes:
        return self._h.digest()

    def hex(self, digits: int = 20) -> str:
        return self._h.hexdigest()[:digits]


def array_digest(*arrays: Any) -> str:
    """The first 20 hex digits of SHA-256 over the arrays' dtypes, shapes and bytes, in order."""
    d = Digest()
    for a in arrays:
        d.array(a)
    return d.hex(20)


def fingerprint(inputs: Any) -> str:
    """The first 20 hex digits of SHA-256 over the canonical JSON of `inputs`."""
    return Digest().json(inputs).hex(20)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (Path, tuple)):
        return str(x) if isinstance(x, Path) else list(x)
    raise TypeError(f"not JSON-serializable: {type(x).__name__}")


def strict_json(obj: Any) -> str:
    """JSON with NaN / Inf refused (they are not JSON): a ValueError names the first one."""
    try:
        return json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"
    except ValueError as e:
        raise ArtifactError(f"refusing to write a non-finite number as JSON ({e}); {_first_nonfinite(obj)}") from e


def _first_nonfinite(obj: Any, path: str = "") -> str:
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{path or 'value'} = {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _first_nonfinite(v, f"{path}/{k}" if path else str(k))
        if found:
            return found
    return ""


def umask() -> int:
    """This process's umask: read from /proc (Linux) so that no other thread ever sees it
    changed; elsewhere by setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` would give a new file under this process's umask (0644 under umask 022).
    mkstemp creates its files 0600; every file capjax writes gets this mode instead, so the
    results folder that several hosts (or users) share stays readable by them."""
    return 0o666 & ~umask()


def _named(e: OSError, path: Path) -> OSError:
    """`e` with `path` as its filename ("[Errno 28] No space left on device: 'out/results.json'")."""
    if e.errno is None or e.filename is not None:
        return e
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Writes through write(file) into a temporary file beside `path`, then renames it over
    `path`: a reader sees the old file or the whole new one, never a part. The file gets the
    umask's mode (`file_mode`); a failed write (a full disk) removes the temporary file and raises
    an OSError that names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, write, binary)
    try:
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _named(e, path) from e
    return path


def _write_to(text: str, f: Any) -> None:
    f.write(text)


def _write_temp(path: Path, write: Callable[[Any], None], binary: bool) -> str:
    """A complete temporary file beside `path` (written, flushed, synced, mode `file_mode()`)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _named(e, path) from e
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _named(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_texts(files: dict[Path, str]) -> None:
    """Writes several text files as one unit: every one is complete on disk (temporary files
    beside them) before the first replaces its old version, so a failure or a kill while writing
    leaves all the old files; the replacements then follow back to back (a rename each)."""
    temps: dict[Path, str] = {}
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = _write_temp(path, partial(_write_to, text), binary=False)
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise
    for path, tmp in temps.items():
        try:
            os.replace(tmp, path)
        except OSError as e:
            for t in temps.values():
                Path(t).unlink(missing_ok=True)
            raise _named(e, path) from e


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def file_digest(path: Path, cache: dict | None = None) -> str:
    """The first 20 hex digits of the SHA-256 of a file's bytes (memoised in `cache` by path, size and mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    d = Digest()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            d.raw(block)
    digest = d.hex(20)
    if cache is not None:
        cache[key] = digest
    return digest


def warn(msg: str) -> None:
    """One "capjax: warning: ..." line on stderr (a result recomputed, a file rewritten)."""
    print(f"capjax: warning: {msg}", file=sys.stderr, flush=True)


def read_npz(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """All arrays of an .npz file a user passes in, or an ArtifactError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found" if not p.exists() else f"{p} is not a file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(
            f"{p} is not a readable .npz file ({type(e).__name__}: {e}); rewrite it (e.g. with capjax score --out)"
        ) from e
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ArtifactError(f"{p} has no {', '.join(map(repr, missing))} array (keys: {', '.join(arrays)})")
    return arrays


# ---------------------------------------------------------------------------- head scores
SCORE_ARRAYS = ("delta", "masked", "baseline")  # [L, H], [U, L, H], [U]: what every scores file holds


def write_scores_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], settings: dict[str, Any]) -> Path:
    """A head-scores .npz (`capjax.attribution.HeadScores.save`): the arrays and their settings
    (JSON in the array "settings"), written atomically; ".npz" is appended when missing, as numpy
    does. Returns the real path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    payload = {**arrays, "settings": np.asarray(json.dumps(settings))}
    return atomic_write(path, lambda f: np.savez(f, **payload))  # type: ignore[arg-type]  # numpy's stub


def read_scores_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a head-scores .npz; a missing, unreadable or incomplete file is an
    ArtifactError (FileNotFoundError) naming it."""
    return read_npz(path, required=SCORE_ARRAYS)


def scores_settings(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The settings saved beside head scores: "settings" (`write_scores_npz`) or "meta" (a results
    folder's artifact); {} for files that recorded none."""
    key = "settings" if "settings" in arrays else "meta" if "meta" in arrays else None
    return json.loads(str(arrays[key])) if key else {}


# ---------------------------------------------------------------------------- keep masks
def write_masks_npz(path: str | os.PathLike, flat: dict[str, Any]) -> Path:
    """Keep masks {kernel path: bool array} as a compressed .npz, written atomically."""
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    return atomic_write(Path(path), lambda f: np.savez_compressed(f, **arrays))  # type: ignore[arg-type]  # numpy's stub


def read_masks(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The keep masks `names` of a masks .npz that `capjax prune` writes, in that order; a
    missing, unreadable or incomplete file is one error naming it (read before any model loads)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"masks file not found: {p} (`capjax prune` writes OUT/masks.npz; pass its path)")
    arrays = read_npz(p)
    missing = [k for k in names if k not in arrays]
    if missing:
        raise ValueError(
            f"{p} lacks the mask(s) {', '.join(missing)} (keys: {', '.join(list(arrays)[:4])}...): "
            "use the masks.npz written by `capjax prune`"
        )
    return {k: arrays[k] for k in names}


def masks_digest(flat: dict[str, Any], names: Sequence[str]) -> str:
    """20 hex digits of SHA-256 over the keep masks `names` of {path: bool array} (paths, shapes
    and bits), so two masks files are compared by content however they were saved."""
    d = Digest()
    for p in names:
        m = np.asarray(flat[p]).astype(bool)
        d.text(f"{p}{m.shape}").raw(np.packbits(m.reshape(-1)).tobytes())
    return d.hex(20)
