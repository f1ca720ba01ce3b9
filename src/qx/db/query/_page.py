"""``Page[T]``: one page of results, from keyset or offset pagination."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Page"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of results.

    Attributes:
        items: the rows of this page, in the query's order.
        page_size: the size that was asked for.
        has_next: whether rows follow this page.
        has_previous: whether rows precede this page.
        next_cursor: keyset cursor of the following page (``None`` on the last page or with
            offset pagination).
        prev_cursor: keyset cursor of the preceding page.
        page_number: the 1-based page number (offset pagination only).
        total: rows matching the query, when asked for with ``with_total=True``.

    Example:
        >>> page = Page(items=[1, 2], page_size=2, has_next=True, has_previous=False)
        >>> list(page), len(page)
        ([1, 2], 2)
    """

    items: list[T]
    page_size: int
    has_next: bool
    has_previous: bool
    next_cursor: str | None = None
    prev_cursor: str | None = None
    page_number: int | None = None
    total: int | None = field(default=None)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
