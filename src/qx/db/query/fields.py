"""Resolving user-supplied field names and sort keys against a mapping and an allow-list."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import ColumnProperty, InstrumentedAttribute, Mapper
from sqlalchemy.sql.elements import ColumnElement

from qx.core.errors import InvalidQuery
from qx.db.query.coerce import coerce_value

__all__ = ["column_attribute", "equality_criteria", "order_by_clauses", "parse_sort"]


def column_attribute(mapper: Mapper[Any], name: str, *, owner: str) -> InstrumentedAttribute[Any]:
    """Return the mapped column attribute ``name`` of ``mapper``.

    Raises:
        InvalidQuery: ``name`` is not a mapped column of the entity.
    """
    prop = mapper.attrs.get(name) if isinstance(name, str) else None
    if not isinstance(prop, ColumnProperty):
        raise InvalidQuery(f"{owner} has no column field {name!r}", field=str(name))
    attr: InstrumentedAttribute[Any] = getattr(mapper.class_, name)
    return attr


def _allowed(name: str, allowed: Iterable[str], *, kind: str, owner: str) -> None:
    if name not in allowed:
        listed = ", ".join(sorted(allowed)) or "none"
        raise InvalidQuery(
            f"{kind} {name!r} is not allowed on {owner} (allowed: {listed})", field=name
        )


def equality_criteria(
    mapper: Mapper[Any], filters: dict[str, Any], *, allowed: Iterable[str], owner: str
) -> list[ColumnElement[bool]]:
    """Build ``column = value`` (or ``IS NULL``) criteria from keyword filters."""
    criteria: list[ColumnElement[bool]] = []
    allowed_set = frozenset(allowed)
    for name, raw in filters.items():
        _allowed(name, allowed_set, kind="filter", owner=owner)
        attr = column_attribute(mapper, name, owner=owner)
        value = coerce_value(attr.expression, raw, field=name)
        criteria.append(attr.is_(None) if value is None else attr == value)
    return criteria


def parse_sort(spec: str | Sequence[str] | None) -> list[tuple[str, bool]]:
    """Parse ``"-created_at,customer"`` or ``["-created_at", "customer"]`` into (name, desc)."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    parsed: list[tuple[str, bool]] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidQuery(f"order_by keys must be strings, got {item!r}", field="order_by")
        key = item.strip()
        desc = key.startswith("-")
        key = key.lstrip("+-")
        if not key:
            raise InvalidQuery(f"order_by has an empty sort key: {spec!r}", field="order_by")
        parsed.append((key, desc))
    return parsed


def order_by_clauses(
    mapper: Mapper[Any],
    spec: str | Sequence[str] | None,
    *,
    allowed: Iterable[str],
    owner: str,
) -> list[ColumnElement[Any]]:
    """Build ORDER BY clauses, always ending with the primary key as a unique tiebreaker."""
    allowed_set = frozenset(allowed)
    clauses: list[ColumnElement[Any]] = []
    used: set[str] = set()
    for name, desc in parse_sort(spec):
        _allowed(name, allowed_set, kind="sort key", owner=owner)
        attr = column_attribute(mapper, name, owner=owner)
        clauses.append(attr.desc() if desc else attr.asc())
        used.add(name)
    for column in inspect(mapper).primary_key:
        key = mapper.get_property_by_column(column).key
        if key not in used:
            clauses.append(getattr(mapper.class_, key).asc())
    return clauses
