"""User plugins: the modules or .py files named in `CAPJAX_PLUGINS` (comma-separated), imported
once, the first time any registry is read (pruning methods, estimators, metrics), so that what
a plugin registers is seen by the CLI's choices, config validation and the runner alike.

A plugin that cannot be imported is a `PluginError` (a ValueError): one line naming the entry
and the fix. This module imports no jax.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

_LOADED: set[str] = set()


class PluginError(ValueError):
    """A `CAPJAX_PLUGINS` entry that cannot be imported (syntax error, import error, a duplicate
    name...); the message names the entry and the fix."""


def load_plugins() -> None:
    """Imports every `CAPJAX_PLUGINS` entry not imported yet."""
    for entry in filter(None, (s.strip() for s in os.environ.get("CAPJAX_PLUGINS", "").split(","))):
        if entry in _LOADED:
            continue
        _LOADED.add(entry)
        if entry.endswith(".py") and not Path(entry).is_file():
            raise FileNotFoundError(f"CAPJAX_PLUGINS: {entry}: plugin file not found; fix the path or remove it "
                                    "from CAPJAX_PLUGINS")
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


def _plugin_failure(e: Exception, entry: str) -> str:
    """What went wrong importing plugin `entry`, and the fix, in one line."""
    if isinstance(e, SyntaxError):
        return f"syntax error at line {e.lineno}: {e.msg}; fix the file or remove it from CAPJAX_PLUGINS"
    if isinstance(e, ModuleNotFoundError) and e.name == entry.split(".")[0] and not entry.endswith(".py"):
        return (f"no module named {entry!r}; put its folder on PYTHONPATH, give the .py file's path, "
                "or remove it from CAPJAX_PLUGINS")
    where = ""
    tb = e.__traceback__
    while tb is not None:  # the plugin's own line that raised (not capjax's)
        if tb.tb_frame.f_code.co_filename.endswith(entry) or entry.replace(".", "/") in tb.tb_frame.f_code.co_filename:
            where = f" (line {tb.tb_lineno})"
        tb = tb.tb_next
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}{where}: {text}; fix the plugin or remove it from CAPJAX_PLUGINS"
