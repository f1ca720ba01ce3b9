"""``Q``: filter conditions combined with ``&``, ``|`` and ``~``.

Example:
    >>> q = Q(status="paid") & ~(Q(customer__startswith="t") | Q(lines__sku="X"))
    >>> q.connector, q.negated, len(q.children)
    ('AND', False, 2)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from qx.core._errors import InvalidQuery, shown

__all__ = ["Q", "normalized"]


class Q:
    """A tree of lookups: leaves are ``("field__lookup", value)``, nodes are AND/OR/NOT.

    ``Q(a=1, b=2)`` means ``a = 1 AND b = 2``; ``Q(...) | Q(...)`` is OR; ``~Q(...)`` is
    NOT. Conditions on the same to-many relationship inside one AND node apply to the same
    related row (``Q(lines__sku="X", lines__quantity__gt=2)``: one line with both).

    Conditions ANDed in one ``filter()`` call - as keywords, or combined with ``&`` - on the
    same to-many relationship must hold for the same related row, as in Django; separate
    ``filter()`` calls, ``|`` and ``~`` each test the relationship on their own.

    Args:
        *children: other ``Q`` objects, ANDed.
        **lookups: ``field__lookup=value`` leaves, ANDed.
    """

    AND: Final = "AND"
    OR: Final = "OR"
    #: Limits of a filter (HTTP-facing): deeper or wider trees are ``InvalidQuery``.
    MAX_DEPTH: Final = 32
    MAX_LEAVES: Final = 200
    __slots__ = ("children", "connector", "negated")

    children: tuple[Q | tuple[str, Any], ...]
    connector: str
    negated: bool

    def __init__(self, *children: Q, **lookups: Any) -> None:
        for child in children:
            if not isinstance(child, Q):
                raise InvalidQuery(
                    f"Q() takes Q objects and keyword lookups, got {shown(child)}", field="q"
                )
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
        # reduce(operator.or_, many) stays one flat node, not a tree as deep as it is long.
        left = self.children if self.connector == connector and not self.negated else (self,)
        return Q._node(connector, (*left, other), False)

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


def normalized(q: Q) -> Q:
    """``q`` with nested nodes of one connector flattened and ORs of equalities on one field
    turned into ``in``, checked against :attr:`Q.MAX_DEPTH` and :attr:`Q.MAX_LEAVES`.

    Raises:
        InvalidQuery: the tree is deeper or has more leaves than the limits allow.
    """
    stack = [(q, 1)]
    while stack:  # depth first, without recursion: a tree may be thousands deep
        node, depth = stack.pop()
        if depth > Q.MAX_DEPTH:
            raise InvalidQuery(
                f"a filter may nest at most {Q.MAX_DEPTH} levels of Q objects", field="q"
            )
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Q))
    flat = _flatten(q)
    leaves = sum(1 for _ in flat.leaves())
    if leaves > Q.MAX_LEAVES:
        raise InvalidQuery(
            f"a filter may have at most {Q.MAX_LEAVES} conditions, got {leaves}", field="q"
        )
    return flat


def _flatten(q: Q) -> Q:
    children: list[Q | tuple[str, Any]] = []
    for child in q.children:
        if not isinstance(child, Q):
            children.append(child)
            continue
        inner = _flatten(child)
        if not inner.children:
            continue
        if not inner.negated and (inner.connector == q.connector or len(inner.children) == 1):
            children.extend(inner.children)  # the same meaning one level up
        else:
            children.append(inner)
    if q.connector == Q.OR:
        children = _equalities_as_in(children)
    return Q._node(q.connector, tuple(children), q.negated)


def _equalities_as_in(children: list[Q | tuple[str, Any]]) -> list[Q | tuple[str, Any]]:
    # field=a OR field=b ... is field IN (a, b, ...): one condition, however many values.
    groups: dict[str, list[Any]] = {}
    for child in children:
        if isinstance(child, tuple) and _is_equality(child):
            groups.setdefault(child[0].removesuffix("__exact"), []).append(child[1])
    merged: list[Q | tuple[str, Any]] = []
    done: set[str] = set()
    for child in children:
        if isinstance(child, tuple) and _is_equality(child):
            field = child[0].removesuffix("__exact")
            if len(groups[field]) > 1:
                if field not in done:
                    done.add(field)
                    merged.append((f"{field}__in", groups[field]))
                continue
        merged.append(child)
    return merged


def _is_equality(leaf: tuple[str, Any]) -> bool:
    key, value = leaf
    if not isinstance(key, str) or value is None or isinstance(value, list | tuple | set):
        return False
    last = key.rsplit("__", 1)[-1]
    return last == "exact" or last not in _LOOKUP_NAMES


# Kept here (not imported from the lookup table) so Q stays a leaf module.
_LOOKUP_NAMES: Final = frozenset(
    {
        "exact", "iexact", "ne", "contains", "icontains", "startswith", "istartswith",
        "endswith", "iendswith", "in", "gt", "gte", "lt", "lte", "range", "isnull",
    }
)  # fmt: skip
