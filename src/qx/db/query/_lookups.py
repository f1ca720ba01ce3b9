"""Django-style lookups: value checking, SQL building and Python evaluation from one table.

Each lookup knows how to check and coerce its value against the column type, how to build a
SQL condition, and how to evaluate the same condition in Python (used by in-memory
repositories and by the tests that compare both).

Every SQL condition built here is *two-valued*: it is never ``NULL``, so ``NOT`` (``exclude``,
``~Q``) means exactly the Python ``not``. A comparison on a nullable column therefore carries
an explicit ``IS NOT NULL``.

Example:
    >>> sorted(LOOKUPS)[:4]
    ['contains', 'endswith', 'exact', 'gt']
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    String,
    Text,
    and_,
    any_,
    bindparam,
    false,
    func,
    literal,
    or_,
    select,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import aiosqlite
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from qx.core._errors import InvalidQuery
from qx.db.query._coerce import coerce_value

__all__ = ["LARGE_IN", "LOOKUPS", "Lookup", "in_condition", "is_text"]

#: Above this many values, ``in`` binds one array (PostgreSQL) or one JSON document (SQLite)
#: instead of one parameter per value: drivers cap parameters at 32,767.
LARGE_IN: Final = 1000


def is_text(type_: TypeEngine[Any]) -> bool:
    """Return whether a column type holds text."""
    if isinstance(type_, TypeDecorator):
        return is_text(type_.impl_instance)
    return isinstance(type_, String | Text)


def _not_null(column: ColumnElement[Any], nullable: bool, condition: ColumnElement[bool]) -> Any:
    return and_(column.is_not(None), condition) if nullable else condition


def _scalar(column: ColumnElement[Any], value: Any, field: str, lookup: str) -> Any:
    coerced = coerce_value(column, value, field=field)
    if coerced is None:
        raise InvalidQuery(f"lookup {field}__{lookup} needs a value, not None", field=field)
    return coerced


def _text(column: ColumnElement[Any], value: Any, field: str, lookup: str) -> str:
    if not is_text(column.type):
        raise InvalidQuery(f"lookup {field}__{lookup} needs a text field", field=field)
    coerced = _scalar(column, value, field, lookup)
    if not isinstance(coerced, str):  # pragma: no cover - text columns coerce to str
        raise InvalidQuery(f"lookup {field}__{lookup} needs a string", field=field)
    return coerced


def _sequence(value: Any, field: str, lookup: str) -> list[Any]:
    if isinstance(value, str):
        # HTTP-facing form: "a,b,c"; an empty string is an empty list.
        return [item for item in value.split(",") if item != ""] if value else []
    if isinstance(value, bytes | bytearray) or not isinstance(value, Iterable):
        raise InvalidQuery(
            f"lookup {field}__{lookup} needs a list of values, got {type(value).__name__}",
            field=field,
        )
    return list(value)


@dataclass(frozen=True, slots=True)
class Lookup:
    """One lookup: how to check its value, build SQL, and evaluate it in Python.

    Attributes:
        name: the suffix after ``__`` (``"gte"``).
        prepare: ``(column, raw value, field) -> value`` checked and coerced.
        build: ``(column, value, nullable, dialect) -> two-valued SQL condition``.
        evaluate: ``(python value, value) -> bool``; the Python meaning of ``build``.
    """

    name: str
    prepare: Callable[[ColumnElement[Any], Any, str], Any]
    build: Callable[[ColumnElement[Any], Any, bool, str], ColumnElement[bool]]
    evaluate: Callable[[Any, Any], bool]


def in_condition(column: ColumnElement[Any], values: Sequence[Any], dialect: str) -> Any:
    """``column IN values`` that works for any number of values on PostgreSQL and SQLite."""
    if not values:
        return false()
    if len(values) <= LARGE_IN:
        return column.in_(values)
    if dialect == "postgresql":
        array = bindparam(None, list(values), type_=postgresql.ARRAY(column.type))
        return column == any_(array)
    if dialect == "sqlite":
        # One JSON document, unpacked by json_each: no per-value parameters. The column type's
        # own bind processing gives the stored representation (UUIDs as hex, say).
        processor = column.type.bind_processor(_sqlite_dialect())
        stored = [processor(v) if processor else v for v in values]
        each = func.json_each(literal(json.dumps(stored, default=str))).table_valued("value")
        return column.in_(select(each.c.value))
    chunks = [column.in_(values[i : i + LARGE_IN]) for i in range(0, len(values), LARGE_IN)]
    return or_(*chunks)


_SQLITE: list[Any] = []


def _sqlite_dialect() -> Any:
    # Built on first use: no dialect objects at import time.
    if not _SQLITE:
        _SQLITE.append(aiosqlite.dialect())
    return _SQLITE[0]


# -- preparation -------------------------------------------------------------------------------


def _prep_exact(column: ColumnElement[Any], value: Any, field: str) -> Any:
    return coerce_value(column, value, field=field)  # None means IS NULL, as in Django


def _prep_in(column: ColumnElement[Any], value: Any, field: str) -> list[Any]:
    items = _sequence(value, field, "in")
    coerced = [coerce_value(column, item, field=field) for item in items]
    if any(item is None for item in coerced):
        raise InvalidQuery(f"lookup {field}__in cannot contain None; use isnull", field=field)
    return list(dict.fromkeys(coerced)) if _hashable(coerced) else coerced


def _hashable(values: list[Any]) -> bool:
    try:
        hash(tuple(values))
    except TypeError:
        return False
    return True


def _prep_range(column: ColumnElement[Any], value: Any, field: str) -> tuple[Any, Any]:
    items = _sequence(value, field, "range")
    if len(items) != 2:
        raise InvalidQuery(f"lookup {field}__range needs exactly two values", field=field)
    low, high = (_scalar(column, item, field, "range") for item in items)
    return low, high


def _prep_isnull(column: ColumnElement[Any], value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "false", "0", "no"}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise InvalidQuery(f"lookup {field}__isnull needs true or false, got {value!r}", field=field)


def _prep(lookup: str) -> Callable[[ColumnElement[Any], Any, str], Any]:
    def prepare(column: ColumnElement[Any], value: Any, field: str) -> Any:
        return _scalar(column, value, field, lookup)

    return prepare


def _prep_text(lookup: str) -> Callable[[ColumnElement[Any], Any, str], Any]:
    def prepare(column: ColumnElement[Any], value: Any, field: str) -> Any:
        return _text(column, value, field, lookup)

    return prepare


# -- SQL ---------------------------------------------------------------------------------------


def _sql_exact(column: ColumnElement[Any], value: Any, nullable: bool, _d: str) -> Any:
    if value is None:
        return column.is_(None)
    return _not_null(column, nullable, column == value)


def _sql_ne(column: ColumnElement[Any], value: Any, nullable: bool, _d: str) -> Any:
    if not nullable:
        return column != value
    return column.is_distinct_from(value)


def _compare(op: str) -> Callable[[ColumnElement[Any], Any, bool, str], Any]:
    def build(column: ColumnElement[Any], value: Any, nullable: bool, _d: str) -> Any:
        condition = _OPERATORS[op](column, value)
        return _not_null(column, nullable, condition)

    return build


def _like(kind: str, insensitive: bool) -> Callable[[ColumnElement[Any], Any, bool, str], Any]:
    def build(column: ColumnElement[Any], value: str, nullable: bool, _d: str) -> Any:
        target = func.lower(column) if insensitive else column
        needle = value.lower() if insensitive else value
        if kind == "exact":
            condition = target == needle
        elif kind == "contains":
            condition = target.contains(needle, autoescape=True)
        elif kind == "startswith":
            condition = target.startswith(needle, autoescape=True)
        else:
            condition = target.endswith(needle, autoescape=True)
        return _not_null(column, nullable, condition)

    return build


def _sql_in(column: ColumnElement[Any], value: list[Any], nullable: bool, dialect: str) -> Any:
    return _not_null(column, nullable and bool(value), in_condition(column, value, dialect))


def _sql_range(column: ColumnElement[Any], value: tuple[Any, Any], nullable: bool, _d: str) -> Any:
    return _not_null(column, nullable, column.between(value[0], value[1]))


def _sql_isnull(column: ColumnElement[Any], value: bool, nullable: bool, _d: str) -> Any:
    if not nullable:
        return false() if value else true()
    return column.is_(None) if value else column.is_not(None)


# -- Python ------------------------------------------------------------------------------------


_OPERATORS: Final = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _py_exact(x: Any, v: Any) -> bool:
    return x is None if v is None else (x is not None and x == v)


def _py_like(kind: str, insensitive: bool) -> Callable[[Any, Any], bool]:
    def evaluate(x: Any, v: str) -> bool:
        if x is None:
            return False
        text, needle = (x.lower(), v.lower()) if insensitive else (x, v)
        if kind == "exact":
            return bool(text == needle)
        if kind == "contains":
            return needle in text
        if kind == "startswith":
            return bool(text.startswith(needle))
        return bool(text.endswith(needle))

    return evaluate


def _py_compare(op: str) -> Callable[[Any, Any], bool]:
    def evaluate(x: Any, v: Any) -> bool:
        return x is not None and bool(_OPERATORS[op](x, v))

    return evaluate


def _lookups() -> dict[str, Lookup]:
    table = [
        Lookup("exact", _prep_exact, _sql_exact, _py_exact),
        Lookup("ne", _prep("ne"), _sql_ne, lambda x, v: x != v),
        Lookup("in", _prep_in, _sql_in, lambda x, v: x is not None and x in v),
        Lookup(
            "range",
            _prep_range,
            _sql_range,
            lambda x, v: x is not None and v[0] <= x <= v[1],
        ),
        Lookup("isnull", _prep_isnull, _sql_isnull, lambda x, v: (x is None) is v),
    ]
    table += [Lookup(op, _prep(op), _compare(op), _py_compare(op)) for op in _OPERATORS]
    for kind in ("exact", "contains", "startswith", "endswith"):
        for insensitive in (False, True):
            name = ("i" if insensitive else "") + kind
            if name == "exact":
                continue
            table.append(
                Lookup(
                    name, _prep_text(name), _like(kind, insensitive), _py_like(kind, insensitive)
                )
            )
    return {lookup.name: lookup for lookup in table}


#: Every lookup by name.
LOOKUPS: Final[dict[str, Lookup]] = _lookups()
