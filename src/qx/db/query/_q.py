"""``Q``: filter conditions combined with ``&``, ``|`` and ``~``.

Example:
    >>> q = Q(status="paid") & ~(Q(customer__startswith="t") | Q(lines__sku="X"))
    >>> q.connector, q.negated, len(q.children)
    ('AND', False, 2)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

__all__ = ["Q"]


class Q:
    """A tree of lookups: leaves are ``("field__lookup", value)``, nodes are AND/OR/NOT.

    ``Q(a=1, b=2)`` means ``a = 1 AND b = 2``; ``Q(...) | Q(...)`` is OR; ``~Q(...)`` is
    NOT. Conditions on the same to-many relationship inside one AND node apply to the same
    related row (``Q(lines__sku="X", lines__quantity__gt=2)``: one line with both).

    Args:
        *children: other ``Q`` objects, ANDed.
        **lookups: ``field__lookup=value`` leaves, ANDed.
    """

    AND: Final = "AND"
    OR: Final = "OR"
    __slots__ = ("children", "connector", "negated")

    children: tuple[Q | tuple[str, Any], ...]
    connector: str
    negated: bool

    def __init__(self, *children: Q, **lookups: Any) -> None:
        for child in children:
            if not isinstance(child, Q):
                raise TypeError(f"Q() takes Q objects and keyword lookups, got {child!r}")
        self.children = (*children, *lookups.items())
        self.connector = Q.AND
        self.negated = False

    @classmethod
    def _node(cls, connector: str, children: tuple[Q | tuple[str, Any], ...], negated: bool) -> Q:
        node = cls.__new__(cls)
        node.children = children
        node.connector = connector
        node.negated = negated
        return node

    def _combine(self, other: object, connector: str) -> Any:
        if not isinstance(other, Q):
            return NotImplemented
        if not other.children:
            return self
        if not self.children:
            return other
        return Q._node(connector, (self, other), False)

    def __and__(self, other: object) -> Q:
        combined: Q = self._combine(other, Q.AND)
        return combined

    def __or__(self, other: object) -> Q:
        combined: Q = self._combine(other, Q.OR)
        return combined

    def __invert__(self) -> Q:
        return Q._node(self.connector, self.children, not self.negated)

    def __bool__(self) -> bool:
        return bool(self.children)

    def leaves(self) -> Iterator[tuple[str, Any]]:
        """Every ``(key, value)`` leaf of the tree."""
        for child in self.children:
            if isinstance(child, Q):
                yield from child.leaves()
            else:
                yield child

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Q):
            return NotImplemented
        return (self.connector, self.negated, self.children) == (
            other.connector,
            other.negated,
            other.children,
        )

    __hash__ = None  # type: ignore[assignment]  # holds unhashable values (lists)

    def __repr__(self) -> str:
        inner = f" {self.connector} ".join(
            repr(child) if isinstance(child, Q) else f"{child[0]}={child[1]!r}"
            for child in self.children
        )
        body = f"({inner})"
        return f"~Q{body}" if self.negated else f"Q{body}"
