"""One registry helper for everything chosen by name (search methods, structures, built-in
models): an unknown name is a UserError that lists what is allowed."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from ticketforge.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # what the entries are, for messages ("search method", "structure", ...)
        self._items: dict[str, T] = {}

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
        if name not in self._items:
            prefix = f"{where}: " if where else ""
            raise UserError(f"{prefix}unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self):
        return sorted(self._items.items())

    def names(self) -> list[str]:
        return sorted(self._items)
