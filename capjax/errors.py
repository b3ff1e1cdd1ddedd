"""Exceptions for expected failures: each is one line naming the file or field and the fix.

The CLI prints any ValueError, OSError, InsufficientMemoryError or MissingDependencyError as that one line and exits
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NonFiniteError(ValueError, FloatingPointError):
    """NaN or Inf where a number is needed (weights, losses, a result)."""


class MissingDependencyError(ImportError):
    """A package a feature needs is not installed (names it and the pip command)."""


class ArtifactError(ValueError):
    """A file capjax wrote earlier (scores, masks, evaluations) that cannot be read back."""


class FolderInUseError(OSError):
    """A results folder another running process writes (names it: pid, host, start time)."""
