"""A memo that starts again when full: :class:`Bounded`.

qx keeps a few things per repository class or per statement that are cheap to remake and
whose keys can come from outside (sort keys from HTTP input, query shapes, tenants): a
bounded map keeps them from growing without end. Starting again when full (rather than
evicting the least recently used) costs nothing per hit, and what is dropped is only
remade.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Bounded"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """At most ``limit`` values by key, each made on first use.

    Example:
        >>> squares: Bounded[int, int] = Bounded(2)
        >>> squares.get_or_make(3, lambda: 9)
        9
    """

    __slots__ = ("_items", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        """The value kept for ``key``, or ``None``."""
        return self._items.get(key)

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value kept for ``key``, made by ``make`` (and kept) the first time."""
        found = self._items.get(key)
        if found is None:
            found = make()
            if len(self._items) >= self._limit:
                self._items.clear()
            self._items[key] = found
        return found

    def __len__(self) -> int:
        return len(self._items)
