"""What differs between PostgreSQL and SQLite, decided in one place: one strategy per backend.

Every statement, engine setting or column conversion qx makes that cannot be written once for
both backends asks the backend's :class:`Dialect`: ``INSERT ... ON CONFLICT`` (each dialect
has its own ``insert`` construct), ``IN`` over more values than a driver accepts parameters,
row locks (``FOR UPDATE [SKIP LOCKED]`` on PostgreSQL; SQLite has no row locks - qx's
``BEGIN IMMEDIATE`` takes the database's write lock for the whole transaction instead),
case folding, the engine's pool and connection setup, how a missing table shows, how a lost
COMMIT is probed, whether other connections can be woken. The strategies live in
:mod:`qx.db._postgresql` and :mod:`qx.db._sqlite` (their base: :mod:`qx.db._dialect_base`);
nothing else in qx compares dialect names (a test checks).

Example:
    >>> from sqlalchemy import column
    >>> str(dialect_named("sqlite").in_(column("x"), [1, 2]).compile())
    'x IN (__[POSTCOMPILE_x_1])'
"""

from __future__ import annotations

from functools import cache
from typing import Any, Final

from qx.core._errors import ConfigurationError
from qx.db._dialect_base import Dialect
from qx.db._postgresql import PostgreSQL
from qx.db._sqlite import SQLite

__all__ = ["BACKENDS", "dialect_named", "dialect_of"]

_STRATEGIES: Final[dict[str, type[Dialect]]] = {
    strategy.name: strategy for strategy in (PostgreSQL, SQLite)
}

BACKENDS: Final = tuple(_STRATEGIES)
"""The SQLAlchemy backend names qx supports, each with its :class:`Dialect`."""


@cache
def dialect_named(name: str) -> Dialect:
    """The :class:`Dialect` for a SQLAlchemy backend name (one instance per name).

    Raises:
        ConfigurationError: qx does not support the backend.
    """
    strategy = _STRATEGIES.get(name)
    if strategy is None:
        raise ConfigurationError(f"qx supports {' and '.join(BACKENDS)}, not {name!r}")
    return strategy()


def dialect_of(bind: Any) -> Dialect:
    """The :class:`Dialect` of an engine, connection or session (sync or async)."""
    found = bind
    if hasattr(found, "get_bind"):  # a session
        found = found.get_bind()
    return dialect_named(found.dialect.name)
