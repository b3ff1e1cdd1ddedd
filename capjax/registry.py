"""One registry shape for every extension point: pruning methods, estimators, metrics, ablation
kinds, model families and evaluation tasks (each module keeps one `Registry` and its own
`register_*` function).

    r = Registry("ablation kind", hint="register one with capjax.ablation.register_kind")
    r.register("zero", fn, builtin=True)   # built-ins: unregister keeps them
    r.register("mine", fn)                 # a taken name: ValueError unless replace=True
    r.names()                              # ("zero", "mine"): registration order
    r.lookup("nope")                       # UnknownNameError: one line listing the known names
    r.unregister("mine")

A registry is a read-only Mapping (name -> entry) too. `on_read` (e.g. `capjax.plugins.load_plugins`)
runs before every read, so plugins register before anyone asks for a name. This module imports
nothing from capjax (floor one).
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name no registry entry has; the message lists the registered ones in one line."""


class Registry(Mapping, Generic[T]):
    """name -> entry, in registration order; see the module docstring."""

    def __init__(
        self,
        what: str,
        *,
        hint: str = "",
        error: type[ValueError] = UnknownNameError,
        on_read: Callable[[], None] | None = None,
        replace_builtins: bool = True,
        unknown: str | None = None,
    ):
        self.what = what  # "pruning method": how errors name an entry
        self.hint = hint  # how to add one, appended to the unknown-name error
        # the unknown-name message, a format string of {name!r} and {known} (default: `unknown_message`'s)
        self.unknown = unknown
        self.error = error
        self.on_read = on_read
        self.replace_builtins = replace_builtins  # False: a built-in name can never be registered again
        self._entries: dict[str, T] = {}
        self._builtins: set[str] = set()

    # ------------------------------------------------------------------ writing
    def register(self, name: str, entry: T, *, replace: bool = False, builtin: bool = False) -> T:
        """Adds `entry` under `name` (returned); a taken name is a ValueError unless `replace`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.what} name must be a non-empty string, got {name!r}")
        if name in self._builtins and not self.replace_builtins:
            raise ValueError(f"{name!r} is a built-in {self.what}; pick another name")
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered; pass replace=True to override it")
        self._entries[name] = entry
        if builtin:
            self._builtins.add(name)
        return entry

    def unregister(self, name: str, *, builtins: bool = False) -> None:
        """Removes `name` (no error when absent); built-ins stay unless `builtins`."""
        if name in self._builtins and not builtins:
            return
        self._entries.pop(name, None)
        self._builtins.discard(name)

    # ------------------------------------------------------------------ reading
    def _read(self) -> None:
        if self.on_read is not None:
            self.on_read()

    def names(self, read: bool = True) -> tuple[str, ...]:
        """Every registered name, in registration order (built-ins first); `read=False`: without
        loading plugins first (while registering)."""
        if read:
            self._read()
        return tuple(self._entries)

    def builtin_names(self) -> tuple[str, ...]:
        return tuple(n for n in self._entries if n in self._builtins)

    def lookup(self, name: str) -> T:
        """The entry of `name`; an unknown name raises `self.error` listing the known names."""
        self._read()
        if name not in self._entries:
            raise self.error(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: Any) -> str:
        """One line: the unknown name, every known name, and how to register one."""
        if self.unknown is not None:
            return self.unknown.format(name=name, known=", ".join(self._entries))
        hint = f" ({self.hint})" if self.hint else ""
        return f"unknown {self.what} {name!r}; known: {', '.join(self._entries) or 'none'}{hint}"

    def items(self) -> ItemsView[str, T]:
        """(name, entry) pairs in registration order, with plugins loaded once (not once per entry)."""
        self._read()
        return dict(self._entries).items()

    def __getitem__(self, name: str) -> T:
        self._read()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._read()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


__all__ = ["Registry", "UnknownNameError"]
