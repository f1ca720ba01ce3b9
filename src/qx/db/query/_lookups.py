"""Django-style lookups: value checking and SQL building from one table.

Each lookup knows how to check and coerce its value against the column type and how to build
a SQL condition.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import String, Text, and_, false, literal, true
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from qx.core._errors import InvalidQuery, shown
from qx.db._dialect import dialect_named
from qx.db.query._coerce import coerce_value

__all__ = ["LOOKUPS", "MAX_PATTERN", "Lookup", "is_text"]

#: The longest text a contains/startswith/endswith (or case-insensitive) lookup takes.
MAX_PATTERN: Final = 10_000


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
    if len(coerced) > MAX_PATTERN:
        # SQLite refuses LIKE patterns over 50,000 characters; nobody types one.
        raise InvalidQuery(
            f"lookup {field}__{lookup} takes at most {MAX_PATTERN} characters", field=field
        )
    return coerced


def _sequence(value: Any, field: str, lookup: str) -> list[Any]:
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            # HTTP-facing form that can carry commas: a JSON array of scalars.
            try:
                parsed = json.loads(value)
            except ValueError:
                raise InvalidQuery(
                    f"lookup {field}__{lookup}: {shown(value, 80)} is not a JSON array",
                    field=field,
                ) from None
            if not isinstance(parsed, list) or any(
                isinstance(item, list | dict) for item in parsed
            ):
                raise InvalidQuery(
                    f"lookup {field}__{lookup} needs a JSON array of values", field=field
                )
            return parsed
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
    """One lookup: how to check its value and build SQL.

    Attributes:
        name: the suffix after ``__`` (``"gte"``).
        prepare: ``(column, raw value, field) -> value`` checked and coerced.
        build: ``(column, value, nullable, dialect) -> two-valued SQL condition``.
    """

    name: str
    prepare: Callable[[ColumnElement[Any], Any, str], Any]
    build: Callable[[ColumnElement[Any], Any, bool, str], ColumnElement[bool]]


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
    raise InvalidQuery(
        f"lookup {field}__isnull needs true or false, got {shown(value)}", field=field
    )


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


_SQL_OPERATORS: Final = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
_COMPARISONS: Final = tuple(_SQL_OPERATORS)


def _compare(op: str) -> Callable[[ColumnElement[Any], Any, bool, str], Any]:
    def build(column: ColumnElement[Any], value: Any, nullable: bool, _d: str) -> Any:
        condition = _SQL_OPERATORS[op](column, value)
        return _not_null(column, nullable, condition)

    return build


def _like(kind: str, insensitive: bool) -> Callable[[ColumnElement[Any], Any, bool, str], Any]:
    def build(column: ColumnElement[Any], value: str, nullable: bool, dialect: str) -> Any:
        if not insensitive:
            if kind == "contains":
                condition = column.contains(value, autoescape=True)
            elif kind == "startswith":
                condition = column.startswith(value, autoescape=True)
            else:
                condition = column.endswith(value, autoescape=True)
            return _not_null(column, nullable, condition)
        # Both sides folded by the same SQL function (see Dialect.fold): a stored value
        # always matches itself, whatever the backend's or Python's case rules are.
        fold = dialect_named(dialect).fold
        target = fold(column)
        if kind == "exact":
            return _not_null(column, nullable, target == fold(literal(value, String())))
        escaped = value.replace("/", "//").replace("%", "/%").replace("_", "/_")
        needle = fold(literal(escaped, String()))
        pattern = {
            "contains": literal("%") + needle + literal("%"),
            "startswith": needle + literal("%"),
            "endswith": literal("%") + needle,
        }[kind]
        return _not_null(column, nullable, target.like(pattern, escape="/"))

    return build


def _sql_in(column: ColumnElement[Any], value: list[Any], nullable: bool, dialect: str) -> Any:
    return _not_null(column, nullable and bool(value), dialect_named(dialect).in_(column, value))


def _sql_range(column: ColumnElement[Any], value: tuple[Any, Any], nullable: bool, _d: str) -> Any:
    return _not_null(column, nullable, column.between(value[0], value[1]))


def _sql_isnull(column: ColumnElement[Any], value: bool, nullable: bool, _d: str) -> Any:
    if not nullable:
        return false() if value else true()
    return column.is_(None) if value else column.is_not(None)


def _lookups() -> dict[str, Lookup]:
    table = [
        Lookup("exact", _prep_exact, _sql_exact),
        Lookup("ne", _prep("ne"), _sql_ne),
        Lookup("in", _prep_in, _sql_in),
        Lookup("range", _prep_range, _sql_range),
        Lookup("isnull", _prep_isnull, _sql_isnull),
    ]
    table += [Lookup(op, _prep(op), _compare(op)) for op in _COMPARISONS]
    for kind in ("exact", "contains", "startswith", "endswith"):
        for insensitive in (False, True):
            name = ("i" if insensitive else "") + kind
            if name == "exact":
                continue
            table.append(Lookup(name, _prep_text(name), _like(kind, insensitive)))
    return {lookup.name: lookup for lookup in table}


#: Every lookup by name.
LOOKUPS: Final[dict[str, Lookup]] = _lookups()
