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

import hashlib
import json
import math
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from capjax.errors import ArtifactError
from capjax.provenance import code_version

SUFFIXES = {"scores": ".npz", "masks": ".npz", "evals": ".json", "recovery": ".json"}  # artifact kind -> file


def fingerprint(inputs: Any) -> str:
    """The first 20 hex digits of SHA-256 over the canonical JSON of `inputs`."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


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
            temps[path] = _write_temp(path, lambda f, text=text: f.write(text), binary=False)  # type: ignore[misc]
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
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()[:20]
    if cache is not None:
        cache[key] = digest
    return digest


def warn(msg: str) -> None:
    print(f"capjax: warning: {msg}", file=sys.stderr, flush=True)


def agreed(found: bool, what: Path) -> bool:
    """Process 0's answer on every process (reuse or recompute must be decided the same way
    everywhere, or the processes would run different collectives)."""
    import jax

    from capjax.distributed import process0_says

    decided = process0_says(found)
    if decided and not found:
        raise ArtifactError(f"process {jax.process_index()} cannot read {what}, which process 0 reuses: "
                            "the results folder must be on a filesystem every process shares")
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
            payload = {**arrays, "meta": np.asarray(json.dumps({**(meta or {}), "fingerprint": fp,
                                                                "code": code_version()}, default=_json_default))}
            atomic_write(path, lambda f: np.savez(f, **payload))  # type: ignore[arg-type]  # numpy's stub
        return path


def read_npz(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """All arrays of an .npz file a user passes in, or an ArtifactError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found" if not p.exists() else f"{p} is not a file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{p} is not a readable .npz file ({type(e).__name__}: {e}); rewrite it "
                            "(e.g. with capjax score --out)") from e
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ArtifactError(f"{p} has no {', '.join(map(repr, missing))} array (keys: {', '.join(arrays)})")
    return arrays
