"""Checking and coercing filter values against column types before any SQL is built.

HTTP-facing code passes strings; Python callers pass typed values. Both end up as the
column's Python type, or as ``InvalidQuery`` naming the field and the value — never as a
driver error halfway through a statement.

Example:
    >>> from sqlalchemy import Column, Integer
    >>> coerce_value(Column("n", Integer()), "42", field="n")
    42
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Final
from uuid import UUID

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    Numeric,
    SmallInteger,
    String,
    Uuid,
)
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from qx.core._errors import InvalidQuery, shown

__all__ = ["coerce_value", "coercer_of"]

_TRUE = frozenset({"true", "1", "yes", "on"})
# ASCII digits only: str.isdigit() and int() also take "²", "١٢" and other Unicode digits.
_INTEGER: Final = re.compile(r"[+-]?[0-9]{1,40}")
#: Decimal text longer than this is refused before it is parsed (a megabyte of digits).
_MAX_NUMBER_TEXT: Final = 100
#: Decimal exponents beyond this overflow the databases' numeric types.
_MAX_EXPONENT: Final = 1000
_FALSE = frozenset({"false", "0", "no", "off"})


def _bad(field: str, value: Any, expected: str) -> InvalidQuery:
    return InvalidQuery(
        f"invalid value {shown(value, 80)} for {shown(field)}: expected {expected}", field=field
    )


def _to_uuid(value: Any, field: str) -> UUID:
    if isinstance(value, UUID):
        return value
    if isinstance(value, str) and value.isascii():
        try:
            return UUID(value)
        except ValueError:
            pass
    raise _bad(field, value, "a UUID")


def _int_parser(bits: int) -> Callable[[Any, str], int]:
    # The column's own range: a value outside it would fail in the driver (or, in SQLite,
    # overflow in Python) after the statement was built.
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def parse(value: Any, field: str) -> int:
        result: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            result = value
        elif isinstance(value, str):
            text = value.strip()
            if _INTEGER.fullmatch(text):
                result = int(text)
        if result is None:
            raise _bad(field, value, "an integer")
        if not low <= result <= high:
            raise _bad(field, value, f"an integer between {low} and {high}")
        return result

    return parse


_to_int = _int_parser(64)


def _to_decimal(value: Any, field: str) -> Decimal:
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int | float | str) and not isinstance(value, bool):
        text = value.strip() if isinstance(value, str) else str(value)
        if len(text) > _MAX_NUMBER_TEXT or not text.isascii():
            raise _bad(field, value, f"a number of at most {_MAX_NUMBER_TEXT} characters")
        try:
            result = Decimal(text)
        except (InvalidOperation, ArithmeticError):
            raise _bad(field, value, "a number") from None
    else:
        raise _bad(field, value, "a number")
    if not result.is_finite():
        raise _bad(field, value, "a finite number")
    if abs(result.adjusted()) > _MAX_EXPONENT:
        raise _bad(field, value, f"a number below 1e{_MAX_EXPONENT} in magnitude")
    return result


def _to_float(value: Any, field: str) -> float:
    result: float | None = None
    if isinstance(value, float | int | Decimal) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:
            result = None
    elif isinstance(value, str) and value.isascii() and len(value) <= _MAX_NUMBER_TEXT:
        try:
            result = float(value)
        except ValueError:
            result = None
    if result is None or not math.isfinite(result):
        raise _bad(field, value, "a finite number")
    return result


def _decimal_parser(precision: int | None, scale: int | None) -> Callable[[Any, str], Decimal]:
    limit = Decimal(10) ** (precision - (scale or 0)) if precision else None

    def parse(value: Any, field: str) -> Decimal:
        result = _to_decimal(value, field)
        if limit is not None and abs(result) >= limit:
            raise _bad(field, value, f"a number below {limit} in magnitude")
        return result

    return parse


def _to_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(field, value, "true or false")


def _to_datetime(value: Any, field: str) -> datetime:
    raw = value
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except (ValueError, UnicodeError):
            raise _bad(field, raw, "an ISO 8601 timestamp with a time zone") from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _bad(field, raw, "a timezone-aware timestamp")
        try:
            return value.astimezone(UTC)
        except OverflowError:
            # 0001-01-01T00:00+01:00 is before the first moment Python can hold in UTC.
            raise _bad(field, raw, "a timestamp between year 1 and 9999 in UTC") from None
    raise _bad(field, raw, "an ISO 8601 timestamp with a time zone")


def _to_date(value: Any, field: str) -> date:
    if isinstance(value, datetime):
        raise _bad(field, value, "a date (not a datetime)")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except (ValueError, UnicodeError):
            pass
    raise _bad(field, value, "an ISO 8601 date")


def _to_str(value: Any, field: str) -> str:
    if isinstance(value, str):
        if "\x00" in value:
            raise _bad(field, value, "text without NUL characters")
        if not _utf8(value):
            raise _bad(field, value, "text without lone surrogates (valid UTF-8)")
        return value
    if isinstance(value, enum.Enum) and isinstance(value.value, str):
        return value.value
    raise _bad(field, value, "a string")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@lru_cache(maxsize=4096)
def _converter(type_: TypeEngine[Any]) -> Callable[[Any, str], Any] | None:
    if isinstance(type_, TypeDecorator):
        if getattr(type_, "python_type", None) is datetime or isinstance(type_.impl, DateTime):
            return _to_datetime
        return _converter(type_.impl_instance)
    if isinstance(type_, JSON):
        return None
    if isinstance(type_, Enum):
        return None  # handled with its allowed values below
    if isinstance(type_, Integer):
        bits = (
            16 if isinstance(type_, SmallInteger) else 64 if isinstance(type_, BigInteger) else 32
        )
        return _int_parser(bits)
    if isinstance(type_, Numeric) and not isinstance(type_, Float):
        return _decimal_parser(type_.precision, type_.scale)
    table: tuple[tuple[type[TypeEngine[Any]], Callable[[Any, str], Any]], ...] = (
        (Uuid, _to_uuid),
        (Boolean, _to_bool),
        (Float, _to_float),
        (DateTime, _to_datetime),
        (Date, _to_date),
        (String, _to_str),
    )
    for klass, convert in table:
        if isinstance(type_, klass):
            return convert
    return None


_DEFAULT_DIALECT: Final = DefaultDialect()


def coerce_value(column: ColumnElement[Any], value: Any, *, field: str) -> Any:
    """Return ``value`` converted to ``column``'s Python type.

    ``None`` is returned unchanged (callers turn it into ``IS NULL``).

    Raises:
        InvalidQuery: the value cannot represent a value of the column's type, or the column
            is JSON (not filterable by value).
    """
    if value is None:
        return None
    return _coercer(column.type)(value, field)


def coercer_of(column: ColumnElement[Any]) -> Callable[[Any, str], Any]:
    """What :func:`coerce_value` does for ``column``, as one function of ``(value, field)``
    (``None`` not handled: callers check it first), for a caller that converts values of
    the same column again and again."""
    return _coercer(column.type)


def _unchanged(value: Any, field: str) -> Any:
    return value


@lru_cache(maxsize=4096)
def _coercer(type_: TypeEngine[Any]) -> Callable[[Any, str], Any]:
    # What coerce_value does for one column type, worked out once per type: every filter
    # value and primary key goes through here.
    if isinstance(type_, JSON) or (
        isinstance(type_, TypeDecorator) and isinstance(type_.impl_instance, JSON)
    ):

        def refuse(value: Any, field: str) -> Any:
            raise InvalidQuery(
                f"field {shown(field)} is JSON and cannot be filtered by value", field=field
            )

        return refuse
    if isinstance(type_, Enum):
        return _enum_coercer(type_)
    # PostgreSQL dialect variants resolve through with_variant's base type: no converter.
    convert = _converter(type_) or _unchanged
    if isinstance(type_, TypeDecorator):
        decorator = type_

        def plain_or_value_object(value: Any, field: str) -> Any:
            if isinstance(value, _PLAIN):
                return convert(value, field)
            return _value_object(decorator, value, field)

        return plain_or_value_object
    return convert


def _enum_coercer(type_: Enum) -> Callable[[Any, str], Any]:
    allowed = list(type_.enums)
    enum_class = type_.enum_class

    def coerce(value: Any, field: str) -> Any:
        raw = value.name if isinstance(value, enum.Enum) and enum_class else value
        if isinstance(value, enum.Enum) and not enum_class:
            raw = value.value
        if raw not in allowed:
            raise _bad(field, value, f"one of {allowed}")
        return enum_class[raw] if enum_class else raw

    return coerce


#: What a request or a caller passes as a plain value: converted to the column's type.
#: Anything else given for a ``TypeDecorator`` column is a value object of the application's
#: (an ``EmailAddress``, a ``UserID``), which the decorator itself turns into a column value.
_PLAIN: Final = (str, bytes, bytearray, bool, int, float, Decimal, datetime, date, UUID)


def _value_object(type_: TypeDecorator[Any], value: Any, field: str) -> Any:
    """``value`` when the column's decorator takes it (as it will when the statement runs),
    ``InvalidQuery`` naming the field when the decorator refuses it."""
    try:
        type_.process_bind_param(value, _DEFAULT_DIALECT)
    except Exception as exc:
        raise _bad(field, value, f"a value {type(type_).__name__} takes") from exc
    return value
