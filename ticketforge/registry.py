"""One registry helper for everything chosen by name (search methods, structures, built-in
models): an unknown name is a UserError that lists what is allowed.

A registry may be given a `discover` callable: it runs once, on the first lookup, and imports the
modules whose import registers entries (a structure registers where it is defined). Importing the
registry itself stays cheap, and the registry does not import its entries' modules statically, so
they may import it without an import loop."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Generic, Iterator, TypeVar

from ticketforge.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, discover: Callable[[], None] | None = None):
        self.kind = kind  # what the entries are, for messages ("search method", "structure", ...)
        self._items: dict[str, T] = {}
        self._discover = discover

    def _entries(self) -> dict[str, T]:
        if self._discover is not None:
            discover, self._discover = self._discover, None  # once; entries it imports may look up others
            discover()
        return self._items

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def register(self, name: str):
        """Decorator form of add()."""
        def deco(item: T) -> T:
            return self.add(name, item)
        return deco

    def get(self, name: str, where: str | None = None) -> T:
        items = self._entries()
        if name not in items:
            prefix = f"{where}: " if where else ""
            raise UserError(f"{prefix}unknown {self.kind} {name!r}; allowed: {', '.join(sorted(items))}")
        return items[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries()))

    def items(self):
        return sorted(self._entries().items())

    def names(self) -> list[str]:
        return sorted(self._entries())


def import_user_module(name: str, option: str) -> ModuleType:
    """A user's module by dotted name, imported from the current directory (an architecture for
    --arch, a plug-in for --plugin that registers a structure when imported); any failure is the
    user's module and becomes one line naming `option`."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except Exception as exc:  # any import failure is the user's module, not ours
        raise UserError(f"{option} cannot import {name!r}: {type(exc).__name__}: {exc}") from None
