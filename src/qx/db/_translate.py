"""Translation of driver errors into the qx error tree, by SQLSTATE — never by message text.

asyncpg reports SQLSTATE directly. SQLite reports extended result codes
(``sqlite_errorname``), which are mapped onto the SQLSTATE they correspond to, so one table
decides the qx class for both backends. The original exception is always chained.

Example:
    >>> error_for_sqlstate("23505", "duplicate").__class__.__name__
    'DuplicateKey'
    >>> error_for_sqlstate("40P01", "deadlock").__class__.__name__
    'TransientError'
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Final

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from qx.core._errors import (
    ConcurrencyConflict,
    DatabaseError,
    DuplicateKey,
    IntegrityViolation,
    QxError,
    StatementTimeout,
    TransientError,
)
from qx.db._transaction import existing_transaction

__all__ = [
    "driver_error",
    "error_for_sqlstate",
    "lost_connection",
    "raise_translated",
    "sqlstate_of",
    "translate_error",
    "translating",
]

# SQLite extended result codes → the SQLSTATE PostgreSQL would report for the same failure.
SQLITE_TO_SQLSTATE: Final[dict[str, str]] = {
    "SQLITE_CONSTRAINT_UNIQUE": "23505",
    "SQLITE_CONSTRAINT_PRIMARYKEY": "23505",
    "SQLITE_CONSTRAINT_ROWID": "23505",
    "SQLITE_CONSTRAINT_FOREIGNKEY": "23503",
    "SQLITE_CONSTRAINT_NOTNULL": "23502",
    "SQLITE_CONSTRAINT_CHECK": "23514",
    "SQLITE_CONSTRAINT_TRIGGER": "23000",
    "SQLITE_CONSTRAINT": "23000",
    "SQLITE_BUSY": "55P03",
    "SQLITE_BUSY_SNAPSHOT": "40001",
    "SQLITE_BUSY_RECOVERY": "55P03",
    "SQLITE_BUSY_TIMEOUT": "55P03",
    "SQLITE_LOCKED": "55P03",
    "SQLITE_LOCKED_SHAREDCACHE": "55P03",
    "SQLITE_INTERRUPT": "57014",
}

_INTEGRITY_NAMES: Final[dict[str, str]] = {
    "23502": "not-null constraint",
    "23503": "foreign-key constraint",
    "23514": "check constraint",
    "23P01": "exclusion constraint",
}

_TRANSIENT: Final[frozenset[str]] = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (and SQLite busy/locked)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "53300",  # too_many_connections
    }
)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it wraps: SQLAlchemy's ``orig``, else the ``__cause__`` (qx's
    translations chain to what they translated), once each."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__


def driver_error(error: BaseException) -> BaseException:
    """The driver's own error behind ``error`` (inside SQLAlchemy's wrapper, or the cause
    of qx's translation), or ``error`` itself when there is none."""
    for current in _chain(error):
        if isinstance(current, sqlite3.Error) or _is_asyncpg_error(current):
            return current
    return error


def sqlstate_of(error: BaseException) -> str | None:
    """Return the SQLSTATE carried by a DBAPI error (asyncpg) or mapped from SQLite's code."""
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if isinstance(code, str) and code:
        return code
    name = getattr(error, "sqlite_errorname", None)
    if isinstance(name, str):
        return SQLITE_TO_SQLSTATE.get(name) or SQLITE_TO_SQLSTATE.get(name.split("_", 2)[0])
    return None


def lost_connection(error: BaseException) -> bool:
    """Whether ``error`` says the connection failed (closed, reset, timed out, SQLSTATE class
    08) rather than the server refusing the statement. A COMMIT that fails so may have
    committed: the answer was lost, not the transaction."""
    for current in _chain(error):
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, ConnectionError | TimeoutError | BrokenPipeError):
            return True
        if (sqlstate_of(current) or "").startswith("08"):
            return True
        # asyncpg's "connection was closed in the middle of operation" carries no SQLSTATE.
        kind = type(current)
        if kind.__module__.startswith("asyncpg") and kind.__name__ in _LOST_CONNECTION_TYPES:
            return True
    return False


_LOST_CONNECTION_TYPES: Final = frozenset({"ConnectionDoesNotExistError", "ConnectionFailureError"})


def _driver_detail(error: BaseException) -> tuple[str | None, str | None]:
    """Return (constraint name, detail) from asyncpg's structured error fields, if present.

    SQLAlchemy's adapted error and the asyncpg exception behind it (its ``__cause__``) may
    each carry some of the fields; take each from wherever it is set.
    """
    constraint = detail = None
    for candidate in (error, error.__cause__):
        if candidate is None:
            continue
        constraint = constraint or getattr(candidate, "constraint_name", None)
        detail = detail or getattr(candidate, "detail", None)
    return constraint, detail


def error_for_sqlstate(
    sqlstate: str | None,
    message: str,
    *,
    constraint: str | None = None,
) -> QxError:
    """Return the qx error for a SQLSTATE (``DatabaseError`` for unknown ones)."""
    if sqlstate == "23505":
        return DuplicateKey(message, constraint=constraint, sqlstate=sqlstate)
    if sqlstate is not None and sqlstate.startswith("23"):
        return IntegrityViolation(message, constraint=constraint, sqlstate=sqlstate)
    if sqlstate in _TRANSIENT or (sqlstate is not None and sqlstate.startswith("08")):
        return TransientError(message, sqlstate=sqlstate)
    if sqlstate == "57014":
        return StatementTimeout(message, sqlstate=sqlstate)
    return DatabaseError(message, sqlstate=sqlstate)


def _describe(sqlstate: str | None, error: BaseException) -> tuple[str, str | None]:
    constraint, detail = _driver_detail(error)
    if sqlstate == "23505":
        what = f"duplicate key violates unique constraint {constraint or '(unnamed)'}"
    elif sqlstate in _INTEGRITY_NAMES:
        what = f"{_INTEGRITY_NAMES[sqlstate]} {constraint or '(unnamed)'} violated"
    elif sqlstate == "57014":
        what = "statement cancelled (statement_timeout exceeded or query cancelled)"
    elif sqlstate in _TRANSIENT or (sqlstate or "").startswith("08"):
        what = f"transient database failure (SQLSTATE {sqlstate}), safe to retry"
    else:
        what = f"database error (SQLSTATE {sqlstate or 'unknown'})"
    # The driver's own words are kept verbatim for humans; no logic depends on them.
    lines = str(error).strip().splitlines()
    driver_text = detail or (lines[0] if lines else None)
    return (f"{what}: {driver_text}" if driver_text else what), constraint


def translate_error(error: BaseException, *, stale: tuple[str, ...] = ()) -> QxError | None:
    """Return the qx error for a SQLAlchemy/driver exception, or ``None`` if not a DB error.

    Args:
        error: the exception raised by SQLAlchemy or the driver.
        stale: descriptions of the aggregates whose version the failing flush checked.
    """
    if isinstance(error, QxError):
        return error
    if isinstance(error, StaleDataError):
        if len(stale) == 1:
            message = f"{stale[0]} was changed or deleted by another transaction; reload and retry"
        elif stale:
            message = (
                f"one of {', '.join(stale)} was changed or deleted by another transaction; "
                "reload and retry"
            )
        else:
            message = "an aggregate was changed or deleted by another transaction; reload and retry"
        return ConcurrencyConflict(message, entities=stale)
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return TransientError(f"database connection lost: {error.orig}", sqlstate=None)
        orig: BaseException = error.orig if error.orig is not None else error
        sqlstate = sqlstate_of(orig)
        message, constraint = _describe(sqlstate, orig)
        return error_for_sqlstate(sqlstate, message, constraint=constraint)
    if isinstance(error, sa_exc.StatementError) and isinstance(error.orig, QxError):
        return error.orig
    if isinstance(error, sa_exc.TimeoutError):
        return TransientError(f"connection pool exhausted: {error}")
    if isinstance(error, sqlite3.Error) or _is_asyncpg_error(error):
        # asyncpg's own exceptions reach callers unwrapped where SQLAlchemy does not adapt
        # them (connecting, on SQLAlchemy 2.0): a wrong database or role is still 3D000/28000.
        sqlstate = sqlstate_of(error)
        message, constraint = _describe(sqlstate, error)
        return error_for_sqlstate(sqlstate, message, constraint=constraint)
    if isinstance(error, TimeoutError):
        # A deadline of the caller's ran out (asyncio.timeout, wait_for): the database did
        # not answer in time, which is not the same as refusing or resetting.
        return TransientError(f"no answer from the database in time ({_reason(error)})")
    if isinstance(error, ConnectionError | OSError) and not isinstance(error, FileNotFoundError):
        return TransientError(f"database unreachable: {_reason(error)}")
    return None


def _reason(error: BaseException) -> str:
    """An error's text, or its kind when it has none (``ConnectionResetError()``)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_asyncpg_error(error: BaseException) -> bool:
    asyncpg = sys.modules.get("asyncpg")  # only a loaded asyncpg can have raised one
    base = getattr(asyncpg, "PostgresError", None)
    return isinstance(base, type) and isinstance(error, base)


def _no_stale() -> tuple[str, ...]:
    return ()


def raise_translated(
    error: BaseException, stale: Callable[[], tuple[str, ...]] = _no_stale
) -> None:
    """Raise the qx error for ``error``, chained to it; return if there is nothing to do.

    The caller re-raises ``error`` itself afterwards (``except Exception as exc:
    raise_translated(exc); raise``). Nothing to do: ``error`` is a qx error already (an
    inner layer translated it) or not a database error at all.

    Args:
        error: the exception being handled.
        stale: returns descriptions of the aggregates whose version the failing flush
            checked; called only for a stale-data error.
    """
    if isinstance(error, QxError) or not isinstance(error, Exception):
        return
    translated = translate_error(error, stale=stale() if isinstance(error, StaleDataError) else ())
    if translated is None:
        return
    if isinstance(error, sa_exc.StatementError) and translated is error.orig:
        raise translated from error.orig.__cause__ or error
    raise translated from error


class _Translating:
    __slots__ = ("_session",)

    def __init__(self, session: Session | None) -> None:
        self._session = session

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            state = existing_transaction(self._session) if self._session is not None else None
            raise_translated(exc, _no_stale if state is None else state.stale)


def translating(session: Session | None = None) -> AbstractContextManager[None]:
    """Run a block, re-raising database errors as qx errors chained to the original.

    A plain class rather than ``@contextmanager``: it wraps every repository call, and a
    generator-based manager costs a generator and two resumptions each time.

    Args:
        session: the session whose flush may fail, to name stale aggregates precisely.
    """
    return _Translating(session)
