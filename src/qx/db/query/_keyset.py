"""Sort specifications, ORDER BY clauses and keyset (seek) predicates.

qx orders ``NULL`` as the *largest* value on every backend (``NULLS LAST`` ascending,
``NULLS FIRST`` descending — PostgreSQL's default, made explicit for SQLite), and always ends
a sort with the primary key (in the direction of the last key) so the order is total and a
keyset boundary is unique.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, false, or_, tuple_
from sqlalchemy.orm import ColumnProperty, Mapper
from sqlalchemy.sql.elements import ColumnElement

from qx.core._errors import InvalidQuery, shown

__all__ = [
    "SortKey",
    "keyset_condition",
    "keyset_segments",
    "order_clauses",
    "parse_sort",
    "resolve_sort",
]


@dataclass(frozen=True, slots=True)
class SortKey:
    """One resolved sort key of the root entity."""

    key: str
    desc: bool
    nullable: bool

    def __str__(self) -> str:
        return f"-{self.key}" if self.desc else self.key


def parse_sort(spec: str | Sequence[str] | None) -> list[tuple[str, bool]]:
    """Parse ``"-created_at,customer"`` or ``["-created_at", "customer"]`` into (name, desc)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        items: list[Any] = spec.split(",")
    elif isinstance(spec, Iterable) and not isinstance(spec, bytes | bytearray):
        items = list(spec)
    else:
        raise InvalidQuery(
            f"sort must be a string or a list of strings, got {shown(spec)}", field="sort"
        )
    parsed: list[tuple[str, bool]] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidQuery(f"sort keys must be strings, got {shown(item)}", field="sort")
        key = item.strip()
        desc = key.startswith("-")
        key = key[1:] if key[:1] in "+-" and key else key
        if not key:
            raise InvalidQuery(f"sort has an empty key: {shown(spec)}", field="sort")
        parsed.append((key, desc))
    return parsed


def resolve_sort(
    mapper: Mapper[Any],
    spec: str | Sequence[str] | None,
    *,
    allowed: Iterable[str],
    owner: str,
) -> tuple[SortKey, ...]:
    """Check sort keys against ``allowed`` and the mapping; append the primary key.

    Raises:
        InvalidQuery: a key that is not allowed, not a column, or repeated.
    """
    allowed_set = frozenset(allowed)
    keys: list[SortKey] = []
    used: set[str] = set()
    for name, desc in parse_sort(spec):
        if name not in allowed_set:
            listed = ", ".join(sorted(allowed_set)) or "none"
            raise InvalidQuery(
                f"sort key {shown(name)} is not allowed on {owner} (allowed: {listed})", field=name
            )
        prop = mapper.attrs.get(name)
        if not isinstance(prop, ColumnProperty) or len(prop.columns) != 1:
            raise InvalidQuery(f"{owner} has no column field {shown(name)} to sort on", field=name)
        if name in used:
            raise InvalidQuery(f"sort key {shown(name)} appears twice", field=name)
        used.add(name)
        keys.append(SortKey(name, desc, bool(getattr(prop.columns[0], "nullable", True))))
    # The tiebreaker runs in the direction of the last key, so a plain index on
    # (key, ..., id) serves the whole order (scanned backwards for descending sorts) and the
    # keyset predicate can be a single row-value comparison.
    tiebreak_desc = keys[-1].desc if keys else False
    for column in mapper.primary_key:
        key = mapper.get_property_by_column(column).key
        if key not in used:
            keys.append(SortKey(key, tiebreak_desc, False))
    return tuple(keys)


def order_clauses(
    entity: Any, keys: Sequence[SortKey], *, reverse: bool = False
) -> list[ColumnElement[Any]]:
    """ORDER BY clauses for ``keys`` (the exact reverse order with ``reverse``)."""
    clauses: list[ColumnElement[Any]] = []
    for key in keys:
        column = getattr(entity, key.key)
        desc = key.desc != reverse
        clause = column.desc() if desc else column.asc()
        if key.nullable:
            # NULL is the largest value: last ascending, first descending.
            clause = clause.nulls_first() if desc else clause.nulls_last()
        clauses.append(clause)
    return clauses


def _equal(column: Any, value: Any) -> Any:
    return column.is_(None) if value is None else column == value


def _beyond(column: Any, value: Any, *, larger: bool, nullable: bool) -> Any:
    """Rows strictly larger (or smaller) than ``value``, NULL counting as the largest."""
    if larger:
        if value is None:
            return false()
        return or_(column > value, column.is_(None)) if nullable else column > value
    if value is None:
        return column.is_not(None)
    return column < value


def keyset_condition(
    entity: Any, keys: Sequence[SortKey], values: Sequence[Any], *, backward: bool
) -> ColumnElement[bool]:
    """Rows after (or, ``backward``, before) the row whose sort-key values are ``values``."""
    columns = [getattr(entity, key.key) for key in keys]
    directions = {key.desc for key in keys}
    if len(directions) == 1 and not any(k.nullable for k in keys) and None not in values:
        # Uniform direction, no NULLs: a row-value comparison, which an index on the sort
        # keys serves directly.
        larger = (not keys[0].desc) != backward
        row, bound = tuple_(*columns), tuple_(*values)
        return row > bound if larger else row < bound
    branches = []
    for i, key in enumerate(keys):
        larger = (not key.desc) != backward
        prefix = [_equal(columns[j], values[j]) for j in range(i)]
        beyond = _beyond(columns[i], values[i], larger=larger, nullable=key.nullable)
        branches.append(and_(*prefix, beyond) if prefix else beyond)
    condition = or_(*branches)
    first, value = keys[0], values[0]
    if value is not None and not first.nullable:
        # A bound on the leading key alone lets an index range scan start at the boundary.
        larger = (not first.desc) != backward
        condition = and_(columns[0] >= value if larger else columns[0] <= value, condition)
    return condition


def keyset_segments(
    entity: Any, keys: Sequence[SortKey], values: Sequence[Any], *, backward: bool
) -> list[ColumnElement[bool]]:
    """The rows after (``backward``: before) the boundary, as conditions to read in turn.

    With a nullable leading key one condition cannot be an index range - its NULLs sort
    apart from its values - and would cost what OFFSET costs. So the rows come in two
    segments, each a range: the values beyond the boundary, then the NULLs (moving towards
    the NULL end), or the NULLs beyond the boundary, then the values (moving away from it).
    """
    first, value = keys[0], values[0]
    if not first.nullable:
        return [keyset_condition(entity, keys, values, backward=backward)]
    column = getattr(entity, first.key)
    towards_nulls = (not first.desc) != backward  # NULL is the largest value
    if value is None:
        after = (
            keyset_condition(entity, keys[1:], values[1:], backward=backward)
            if len(keys) > 1
            else false()
        )
        same_nulls = and_(column.is_(None), after)
        return [same_nulls] if towards_nulls else [same_nulls, column.is_not(None)]
    within = and_(
        column >= value if towards_nulls else column <= value,
        keyset_condition(entity, keys, values, backward=backward),
    )
    return [within, column.is_(None)] if towards_nulls else [within]
