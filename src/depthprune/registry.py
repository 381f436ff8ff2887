"""One registry class for every kind of named, pluggable entry.

Metrics, Shapley estimators, value functions and evaluation task kinds are each one
:class:`Registry` instance. An entry is added once, at import time, by the module that
implements it (usually through a decorator); a lookup miss becomes an
:class:`~depthprune.errors.InputError` that suggests the closest name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from depthprune.errors import unknown_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        what: What an entry is, for messages (e.g. ``"metric"``, ``"task kind"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second entry of the same name is a bug."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry called ``name``.

        Raises:
            InputError: no such entry; the message names the closest one and all of them.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise unknown_choice(self.what, name, self._entries) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def values(self) -> list[T]:
        """Registered entries, in registration order."""
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
