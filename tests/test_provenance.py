"""capjax.provenance: the code version names the release and, in a git checkout, the commit and
whether capjax/ differs from it (git itself is the oracle)."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import jax
import pytest

import capjax
from capjax import provenance

ROOT = Path(capjax.__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="capjax is not imported from a git checkout")
def test_code_version_names_the_commit_and_local_changes():
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "capjax"]).returncode == 1
    want = f"{importlib.metadata.version('capjax')}+g{head[:12]}" + (".modified" if changed else "")
    assert provenance.code_version() == want
    assert provenance.git_state() == {"commit": head, "modified": changed}


def test_outside_a_checkout_the_release_alone(monkeypatch):
    monkeypatch.setattr(provenance, "git_state", lambda: None)
    provenance.code_version.cache_clear()
    try:
        assert provenance.code_version() == importlib.metadata.version("capjax")
    finally:
        provenance.code_version.cache_clear()


def test_environment_and_its_line():
    env = provenance.environment()
    assert env["packages"]["jax"] == jax.__version__ and env["backend"] == jax.default_backend()
    assert env["devices"]["count"] == len(jax.devices()) and env["processes"] == jax.process_count()
    line = provenance.describe(env)
    assert line.startswith(f"capjax {provenance.code_version()}, jax {jax.__version__}, transformers ")
    assert f"{len(jax.devices())} x {jax.devices()[0].device_kind}" in line
