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


class InsufficientMemoryError(MemoryError):
    """The params would not fit where they are loaded; raised before anything is read."""


def one_line(e: BaseException) -> str:
    """An expected error as the one line the CLIs print (an OSError's file name appended when its text lacks it)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


def expected_error(e: BaseException) -> bool:
    """Bad input (files, paths, numbers, non-finite weights or results, a missing package, too little
    memory): one clear line. Anything else is a bug and keeps its traceback."""
    return isinstance(e, (ValueError, OSError, InsufficientMemoryError, MissingDependencyError))
