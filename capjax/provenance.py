"""What produced a result: the capjax code (release and, in a git checkout, the commit) and the
environment it ran in (package versions, backend, devices, processes).

Artifacts record `code_version()` so that a results folder reused by other code says so (see
`capjax.experiment.store`); results.json records `environment()`. This module imports no jax at
import time.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("capjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy")


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any] | None:
    """{"commit": sha, "modified": bool} when capjax is imported from a git checkout (an editable
    install), else None. "modified": the checkout's capjax/ differs from that commit."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "capjax")
    return {"commit": commit, "modified": bool(status)}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """e.g. "0.1.0", "0.1.0+g1a2b3c4d5e6f" or "0.1.0+g1a2b3c4d5e6f.modified" (PEP 440 local label)."""
    version = _installed("capjax") or "unknown"
    git = git_state()
    if git is None:
        return version
    return f"{version}+g{git['commit'][:12]}" + (".modified" if git["modified"] else "")


def code_digest(obj: Any) -> str | None:
    """The code a user's plugin runs, for fingerprints: the first 20 hex digits of SHA-256 over the
    source file that defines `obj` (a function, class or callable instance; the whole file, so
    helpers beside it count) and, recursively, over the functions its closure holds (so a capjax
    wrapper such as `logits_metric(fn)` is keyed by `fn`). None for capjax's own code, which
    `code_version` versions. Code without a file (a REPL, exec) is keyed by its bytecode and
    constants. Modules the file imports are not followed: a plugin split over files is keyed by
    the file that defines the registered object."""
    import hashlib
    import inspect
    import marshal

    parts: list[str] = []
    seen: set[int] = set()

    def visit(o: Any) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, functools.partial):
            o = o.func
        try:
            o = inspect.unwrap(o)  # functools.wraps wrappers, jax.jit
        except ValueError:  # a cycle of __wrapped__
            pass
        o = getattr(o, "__func__", o)  # bound methods
        if not (inspect.isfunction(o) or inspect.isclass(o)) and callable(o):
            o = type(o)  # a callable instance: its class's code
        module = getattr(o, "__module__", "") or ""
        if not (module == "capjax" or module.startswith("capjax.")):
            try:
                source = inspect.getsourcefile(o)
                if source is None:
                    raise TypeError(f"{o!r} has no source file")
                parts.append(hashlib.sha256(Path(source).read_bytes()).hexdigest())
            except (TypeError, OSError):
                code = getattr(o, "__code__", None)
                parts.append(hashlib.sha256(marshal.dumps(code) if code is not None else repr(o).encode()).hexdigest())
        for cell in getattr(o, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if inspect.isfunction(value) or inspect.isclass(value) or isinstance(value, functools.partial):
                visit(value)

    visit(obj)
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:20] if parts else None


def environment() -> dict[str, Any]:
    """Code version, package versions, Python, platform, and the JAX backend, devices and processes."""
    import jax

    devices = jax.devices()
    return {
        "code": code_version(),
        "git": git_state(),
        "packages": {name: _installed(name) for name in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": {"count": len(devices), "kind": devices[0].device_kind},
        "processes": jax.process_count(),
    }


def describe(env: dict[str, Any]) -> str:
    """One line: "capjax 0.1.0+g1a2b3c4d5e6f, jax 0.10.2, transformers 5.24.0; cpu: 1 x cpu, 1 process"."""
    p = env["packages"]
    d = env["devices"]
    return (
        f"capjax {env['code']}, jax {p['jax']}, transformers {p['transformers']}; {env['backend']}: "
        f"{d['count']} x {d['kind']}, {env['processes']} process{'es' if env['processes'] > 1 else ''}"
    )
