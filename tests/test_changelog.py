"""CHANGELOG.md has a heading for the version pyproject.toml declares (docs/versioning.md)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HEADING = re.compile(r"^## (?P<title>.+?)\s*$", re.M)
_VERSION = re.compile(r"(?P<version>\d+\.\d+\.\d+)(?: - \d{4}-\d{2}-\d{2})?")


def changelog_problems(changelog: str, version: str) -> list[str]:
    """One line per way `changelog` disagrees with docs/versioning.md for the declared `version`."""
    problems, versions = [], []
    for m in _HEADING.finditer(changelog):
        title = m.group("title")
        v = _VERSION.fullmatch(title)
        if v:
            versions.append(v.group("version"))
        elif title != "Unreleased":
            problems.append(f"CHANGELOG.md: heading '## {title}' is neither '## Unreleased' nor '## X.Y.Z'")
    if version not in versions:
        problems.append(f"CHANGELOG.md has no '## {version}' heading for pyproject.toml's version: add one")
    key = [tuple(int(x) for x in v.split(".")) for v in versions]
    if key != sorted(key, reverse=True) or len(set(key)) != len(key):
        problems.append(f"CHANGELOG.md: versions must go newest first, once each (found {versions})")
    return problems


def test_changelog_has_the_declared_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert changelog_problems((ROOT / "CHANGELOG.md").read_text(), version) == []


@pytest.mark.parametrize(
    "text, version, expected",
    [
        ("## Unreleased\n## 0.2.0 - 2026-01-02\n## 0.1.0\n", "0.2.0", []),
        (
            "## Unreleased\n## 0.1.0\n",
            "0.2.0",
            ["CHANGELOG.md has no '## 0.2.0' heading for pyproject.toml's version: add one"],
        ),
        (
            "### 0.2.0\n## 0.1.0\n",
            "0.2.0",
            ["CHANGELOG.md has no '## 0.2.0' heading for pyproject.toml's version: add one"],
        ),
        (
            "## 0.1.0\n## 0.2.0\n",
            "0.2.0",
            ["CHANGELOG.md: versions must go newest first, once each (found ['0.1.0', '0.2.0'])"],
        ),
        ("## Next\n## 0.1.0\n", "0.1.0", ["CHANGELOG.md: heading '## Next' is neither '## Unreleased' nor '## X.Y.Z'"]),
    ],
)
def test_changelog_problems(text, version, expected):
    assert changelog_problems(text, version) == expected
