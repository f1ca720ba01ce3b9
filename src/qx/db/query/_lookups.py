"""Django-style lookups: value checking and SQL building from one table.

Each lookup knows how to check and coerce its value against the column type, how that value
enters a statement (:class:`Binding`: as named bound parameters, or as part of the SQL's
shape, like ``IS NULL`` for ``None``) and how to build a SQL condition.

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

from sqlalchemy import String, Text, and_, bindparam, false, literal, true
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from qx.core._errors import InvalidQuery, shown
from qx.db._dialect import dialect_named
from qx.db._dialect_base import LARGE_IN
from qx.db.query._coerce import coerce_value

__all__ = ["LOOKUPS", "MAX_PATTERN", "Binding", "Lookup", "is_text"]

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


def _escaped(value: str) -> str:
    # LIKE with ESCAPE '/': the pattern characters and the escape character itself.
    return value.replace("/", "//").replace("%", "/%").replace("_", "/_")


class Binding:
    """How a lookup's checked value enters a statement: one bound parameter named ``key``.

    A statement built from placeholders is the same for every value of the same *shape*, so
    a query plan built once serves every later value, which is passed as ``params``.
    Subclasses put what changes the SQL itself (``None`` as ``IS NULL``, a flag) into the
    shape instead.
    """

    __slots__ = ()

    def shape(self, value: Any) -> object:
        """What of ``value`` the SQL depends on; ``None``: this value cannot be a parameter
        (the statement is built for it alone)."""
        return 0

    def params(self, key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        """The bound parameters carrying ``value``."""
        return ((key, value),)

    def placeholder(self, key: str, value: Any, type_: TypeEngine[Any]) -> Any:
        """What the lookup's ``build`` gets in place of ``value`` (the value attached, so a
        statement built for this value runs as it is)."""
        return bindparam(key, value, type_=type_)


class _Optional(Binding):
    """``None`` is ``IS NULL``: part of the shape, no parameter."""

    __slots__ = ()

    def shape(self, value: Any) -> object:
        return value is None

    def params(self, key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        return () if value is None else ((key, value),)

    def placeholder(self, key: str, value: Any, type_: TypeEngine[Any]) -> Any:
        return None if value is None else super().placeholder(key, value, type_)


class _Flag(Binding):
    """A boolean that chooses the SQL (``isnull``): all shape."""

    __slots__ = ()

    def shape(self, value: Any) -> object:
        return bool(value)

    def params(self, key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        return ()

    def placeholder(self, key: str, value: Any, type_: TypeEngine[Any]) -> Any:
        return value


class _List(Binding):
    """One expanding parameter; an empty list is ``false`` and a very large one takes the
    dialect's large-``IN`` form, which are built for their value."""

    __slots__ = ()

    def shape(self, value: Any) -> object:
        if not value:
            return "empty"
        return "list" if len(value) <= LARGE_IN else None

    def params(self, key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        return ((key, value),) if self.shape(value) == "list" else ()

    def placeholder(self, key: str, value: Any, type_: TypeEngine[Any]) -> Any:
        if self.shape(value) == "list":
            return bindparam(key, value, type_=type_, expanding=True)
        return value


class _Pair(Binding):
    """Two parameters (``range``): ``key_lo`` and ``key_hi``."""

    __slots__ = ()

    def params(self, key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        return ((key + "_lo", value[0]), (key + "_hi", value[1]))

    def placeholder(self, key: str, value: Any, type_: TypeEngine[Any]) -> Any:
        return tuple(bindparam(name, bound, type_=type_) for name, bound in self.params(key, value))


class _Text(Binding):
    """A text parameter: LIKE patterns escaped here (``ESCAPE '/'``); the case-insensitive
    lookups compare it as plain text, folded by the dialect."""

    __slots__ = ("_escape", "_plain")

    def __init__(self, *, escape: bool, plain: bool) -> None:
        self._escape = escape
        self._plain = plain

    def params(self, key: str, value: Any) -> tuple[tuple[str, Any], ...]:
        return ((key, _escaped(value) if self._escape else value),)

    def placeholder(self, key: str, value: Any, type_: TypeEngine[Any]) -> Any:
        ((name, text),) = self.params(key, value)
        return bindparam(name, text, type_=String() if self._plain else type_)


_SCALAR: Final = Binding()


@dataclass(frozen=True, slots=True)
class Lookup:
    """One lookup: how to check its value, bind it and build SQL.

    Attributes:
        name: the suffix after ``__`` (``"gte"``).
        prepare: ``(column, raw value, field) -> value`` checked and coerced.
        build: ``(column, placeholder, nullable, dialect) -> two-valued SQL condition``;
            the placeholder is what ``binding`` made of the value.
        binding: how the checked value enters the statement.
    """

    name: str
    prepare: Callable[[ColumnElement[Any], Any, str], Any]
    build: Callable[[ColumnElement[Any], Any, bool, str], ColumnElement[bool]]
    binding: Binding = _SCALAR


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
    # ``value`` is the bound text, already escaped for LIKE (see _Text).
    def build(column: ColumnElement[Any], value: Any, nullable: bool, dialect: str) -> Any:
        if not insensitive:
            if kind == "contains":
                condition = column.contains(value, escape="/")
            elif kind == "startswith":
                condition = column.startswith(value, escape="/")
            else:
                condition = column.endswith(value, escape="/")
            return _not_null(column, nullable, condition)
        # Both sides folded by the same SQL function (see Dialect.fold): a stored value
        # always matches itself, whatever the backend's or Python's case rules are.
        fold = dialect_named(dialect).fold
        target = fold(column)
        if kind == "exact":
            return _not_null(column, nullable, target == fold(value))
        needle = fold(value)
        pattern = {
            "contains": literal("%") + needle + literal("%"),
            "startswith": needle + literal("%"),
            "endswith": literal("%") + needle,
        }[kind]
        return _not_null(column, nullable, target.like(pattern, escape="/"))

    return build


def _sql_in(column: ColumnElement[Any], value: Any, nullable: bool, dialect: str) -> Any:
    if isinstance(value, BindParameter):  # a list of up to LARGE_IN values (see _List)
        return _not_null(column, nullable, column.in_(value))
    return _not_null(column, nullable and bool(value), dialect_named(dialect).in_(column, value))


def _sql_range(column: ColumnElement[Any], value: tuple[Any, Any], nullable: bool, _d: str) -> Any:
    return _not_null(column, nullable, column.between(value[0], value[1]))


def _sql_isnull(column: ColumnElement[Any], value: bool, nullable: bool, _d: str) -> Any:
    if not nullable:
        return false() if value else true()
    return column.is_(None) if value else column.is_not(None)


def _lookups() -> dict[str, Lookup]:
    table = [
        Lookup("exact", _prep_exact, _sql_exact, _Optional()),
        Lookup("ne", _prep("ne"), _sql_ne),
        Lookup("in", _prep_in, _sql_in, _List()),
        Lookup("range", _prep_range, _sql_range, _Pair()),
        Lookup("isnull", _prep_isnull, _sql_isnull, _Flag()),
    ]
    table += [Lookup(op, _prep(op), _compare(op)) for op in _COMPARISONS]
    for kind in ("exact", "contains", "startswith", "endswith"):
        for insensitive in (False, True):
            name = ("i" if insensitive else "") + kind
            if name == "exact":
                continue
            binding = _Text(escape=kind != "exact", plain=insensitive)
            table.append(Lookup(name, _prep_text(name), _like(kind, insensitive), binding))
    return {lookup.name: lookup for lookup in table}


#: Every lookup by name.
LOOKUPS: Final[dict[str, Lookup]] = _lookups()
