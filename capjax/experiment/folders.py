"""Whole-folder guarantees: one writer per results folder, and an export folder replaced as a unit.

`results_lock(out)`: a `capjax run` holds an exclusive lock (`flock`) on `<out>/.capjax-run.lock`
while it runs; a second run into the same folder is refused in one line naming the holder (pid,
host, start time, command). The lock file records its holder; a holder that died (SIGKILL, a
lost host) releases the kernel lock with it, and the next run takes over and says so.

`replaced_folder(out)`: everything is written into an empty temporary folder beside `out`, which
then replaces `out` whole (an atomic exchange where the OS has one, else two renames). A reader
finds the old folder or the new one, never a mix; a failure or a kill while writing leaves the
old folder untouched (the next export removes the dead writer's temporary folder).

This module imports no jax.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from capjax.errors import FolderInUseError
from capjax.experiment.store import file_mode, warn

LOCK_NAME = ".capjax-run.lock"


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']} (started {h['started']}: {h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself)"


@contextlib.contextmanager
def results_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Holds the lock of results folder `out` for the block; a FolderInUseError (one line naming
    the process that holds it) if another process holds it."""
    import fcntl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
            raise FolderInUseError(
                f"results folder {out} is in use by {holder}: wait for that run to end, or choose another out="
            ) from None
        left = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        if left.strip():  # its holder died without releasing it (the kernel released its flock)
            warn(f"taking over the lock {path} of {_holder(left)}, which is no longer running")
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly (the file stays: see _holder)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- a folder replaced whole
def check_replaceable(out: str | os.PathLike, marker: str, field: str = "--out") -> Path:
    """`out` (absolute) if an export may replace it: absent, an empty folder, or an earlier export
    (it holds `marker`). Anything else holds files the replacement would delete: a ValueError."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"{field} {out} is a file, not a folder: choose another {field}")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ValueError(
            f"{field} {out} holds files and is not an earlier export (no {marker}); an export "
            f"replaces its folder whole: choose a new or empty {field}"
        )
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.capjax-{kind}-{pid}"


def _remove_dead_writers(out: Path) -> None:
    """Temporary folders beside `out` left by an export that was killed (its pid is gone)."""
    for kind in ("new", "old"):
        for p in out.parent.glob(f".{out.name}.capjax-{kind}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                warn(f"removing {p}, left by an export (pid {pid}) that did not finish")
                shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _sync_tree(folder: Path) -> None:
    """Every file under `folder` on disk, with the umask's mode (some writers, e.g. safetensors,
    create 0600 files), before the folder is renamed into place."""
    mode = file_mode()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def replaced_folder(out: str | os.PathLike, marker: str, field: str = "--out") -> Iterator[Path]:
    """Yields an empty temporary folder beside `out` to write into; when the block ends without an
    error it replaces `out` whole (`marker`: the file that makes `out` an earlier export, see
    `check_replaceable`). On an error the temporary folder is removed and `out` is unchanged."""
    out = check_replaceable(out, marker, field)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(out)
    new, old = _temp_name(out, "new", os.getpid()), _temp_name(out, "old", os.getpid())
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()  # the umask's mode, as any folder (not mkdtemp's 0700)
    try:
        yield new
        _sync_tree(new)
        if not out.exists():
            os.rename(new, out)
        elif _exchange(new, out):
            shutil.rmtree(new)  # now the old export
        else:
            os.rename(out, old)
            os.rename(new, out)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
