"""The relay's short transactions: one protocol, run through SQLAlchemy Core or, on
PostgreSQL, on the asyncpg connection itself with each statement compiled once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Compiled", "CoreTx", "DriverTx", "Tx", "terminate"]


class Tx(Protocol):
    """One relay transaction."""

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        """Rows of a query, as tuples in the order of its select list."""

    async def run(self, stmt: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Run a statement (once per mapping when given several)."""


class CoreTx:
    """Statements through SQLAlchemy Core on an ``AsyncConnection``."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        return list(await self.conn.execute(stmt, dict(params)))

    async def run(self, stmt: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        if isinstance(params, Mapping):
            await self.conn.execute(stmt, dict(params))
        elif params:
            await self.conn.execute(stmt, [dict(p) for p in params])


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement compiled for the driver: SQL, parameter order, its own parameters."""

    sql: str
    order: tuple[str, ...]
    fixed: dict[str, Any]


class DriverTx:
    """Statements on the asyncpg connection, each compiled once (``compiled`` is the
    caller's cache, keyed by statement)."""

    def __init__(self, driver: Any, dialect: Any, compiled: dict[int, Compiled]) -> None:
        self.driver, self.dialect, self.compiled = driver, dialect, compiled

    def _args(self, stmt: Any, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        found = self.compiled.get(id(stmt))
        if found is None:
            compiled = stmt.compile(dialect=self.dialect)
            found = self.compiled[id(stmt)] = Compiled(
                compiled.string, tuple(compiled.positiontup or ()), dict(compiled.params)
            )
        # Parameters the statement carries itself (a LIMIT 1) come from the compilation.
        return found.sql, [params[n] if n in params else found.fixed[n] for n in found.order]

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        sql, args = self._args(stmt, params)
        found: Sequence[Sequence[Any]] = await self.driver.fetch(sql, *args)
        return found

    async def run(self, stmt: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        if isinstance(params, Mapping):
            sql, args = self._args(stmt, params)
            await self.driver.execute(sql, *args)
        elif params:
            many = [self._args(stmt, p) for p in params]
            await self.driver.executemany(many[0][0], [args for _, args in many])


def terminate(raw: Any) -> None:
    """Close a driver connection's socket at once, without a round trip."""
    driver = getattr(raw, "driver_connection", None)
    closing = getattr(driver, "terminate", None)
    if closing is not None:
        with contextlib.suppress(Exception):
            closing()
