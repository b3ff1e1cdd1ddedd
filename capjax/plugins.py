"""User plugins, imported once, the first time any registry is read (pruning methods, estimators,
metrics, ablation kinds, model families, tasks), so that what a plugin registers is seen by the
CLI's choices, config validation and the runner alike:

  - installed packages' entry points in the group `capjax.plugins` (in the package's pyproject:
    `[project.entry-points."capjax.plugins"] mine = "my_pkg.capjax_plugin"`); an entry point naming
    a module imports it, one naming a function ("my_pkg.plugin:register") also calls it;
  - then the modules or .py files named in `CAPJAX_PLUGINS` (comma-separated).

A plugin that cannot be imported is a `PluginError` (a ValueError): one line naming the entry
and the fix. This module imports no jax.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

GROUP = "capjax.plugins"
_LOADED: set[str] = set()
_ENTRY_POINTS_LOADED: set[str] = set()
_SCANNED_PATH: list[tuple[str, ...]] = []  # the sys.path entry points were last looked up on
# (sys.path, CAPJAX_PLUGINS) when every plugin they name was last loaded: a registry is read dozens of
# times per command (each CLI choice list), and nothing is left to load until one of them changes
_DONE: list[tuple[tuple[str, ...], str]] = []


class PluginError(ValueError):
    """A `CAPJAX_PLUGINS` entry that cannot be imported (syntax error, import error, a duplicate
    name...); the message names the entry and the fix."""


def load_plugins() -> None:
    """Loads every `capjax.plugins` entry point and imports every `CAPJAX_PLUGINS` entry not loaded yet."""
    state = (tuple(sys.path), os.environ.get("CAPJAX_PLUGINS", ""))
    if _DONE and _DONE[0] == state:
        return
    _load_entry_points()
    for entry in filter(None, (s.strip() for s in state[1].split(","))):
        if entry in _LOADED:
            continue
        _LOADED.add(entry)
        if entry.endswith(".py") and not Path(entry).is_file():
            raise FileNotFoundError(
                f"CAPJAX_PLUGINS: {entry}: plugin file not found; fix the path or remove it from CAPJAX_PLUGINS"
            )
        try:
            if entry.endswith(".py"):
                path = Path(entry)
                module_spec = importlib.util.spec_from_file_location(f"capjax_plugin_{path.stem}", path)
                assert module_spec is not None and module_spec.loader is not None  # a .py path has both
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        # Whatever a user's plugin raises while it is imported is that file's problem: one line naming it.
        except Exception as e:
            raise PluginError(f"CAPJAX_PLUGINS: {entry}: {_plugin_failure(e, entry)}") from e
    _DONE[:] = [state]


def _load_entry_points() -> None:
    """Loads the group's entry points; looked up again only when sys.path changed (a registry is
    read often, and scanning every installed package each time would cost milliseconds)."""
    from importlib.metadata import entry_points

    if _SCANNED_PATH and _SCANNED_PATH[0] == tuple(sys.path):
        return
    _SCANNED_PATH[:] = [tuple(sys.path)]
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        key = f"{ep.name}={ep.value}@{dist.locate_file('') if dist is not None else ''}"  # where it is installed
        if key in _ENTRY_POINTS_LOADED:
            continue
        _ENTRY_POINTS_LOADED.add(key)
        try:
            target = ep.load()
            if callable(target):
                target()
        # Whatever an installed plugin raises while it loads is that package's problem: one line naming it.
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            package = getattr(dist, "name", None)
            raise PluginError(
                f"entry point {ep.name} = {ep.value!r} (group {GROUP}"
                f"{f', package {package}' if package else ''}): {type(e).__name__}: {text}; fix or "
                "uninstall that package"
            ) from e


def _plugin_failure(e: Exception, entry: str) -> str:
    """What went wrong importing plugin `entry`, and the fix, in one line."""
    if isinstance(e, SyntaxError):
        return f"syntax error at line {e.lineno}: {e.msg}; fix the file or remove it from CAPJAX_PLUGINS"
    if isinstance(e, ModuleNotFoundError) and e.name == entry.split(".")[0] and not entry.endswith(".py"):
        return (
            f"no module named {entry!r}; put its folder on PYTHONPATH, give the .py file's path, "
            "or remove it from CAPJAX_PLUGINS"
        )
    where = ""
    tb = e.__traceback__
    while tb is not None:  # the plugin's own line that raised (not capjax's)
        if tb.tb_frame.f_code.co_filename.endswith(entry) or entry.replace(".", "/") in tb.tb_frame.f_code.co_filename:
            where = f" (line {tb.tb_lineno})"
        tb = tb.tb_next
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}{where}: {text}; fix the plugin or remove it from CAPJAX_PLUGINS"
