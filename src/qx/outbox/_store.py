"""The relay's SQL: claiming due rows in per-aggregate order, marking, retrying, reporting.

Ordering: a row is claimable only if it is the *head* of its aggregate — no earlier row of
the same aggregate is still pending (unpublished and not dead). Relays lock heads with
``FOR UPDATE SKIP LOCKED``, so an aggregate belongs to one relay at a time; the relay then
takes that aggregate's later pending rows too, in position order. A row that fails stays
the head, so nothing after it is published before it. Rows without an aggregate have no
order to keep and are each their own head.

Example:
    >>> store = OutboxStore(engine)                      # doctest: +SKIP
    >>> async with engine.begin() as conn:                # doctest: +SKIP
    ...     rows = await store.claim(conn, batch_size=200, now=utcnow())
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import (
    Integer,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from qx.db._dialect import dialect_named
from qx.outbox._table import outbox_table
from qx.settings import RelaySettings

__all__ = ["Failure", "OutboxBatch", "OutboxStatus", "OutboxStore", "backoff_delay"]

_o = outbox_table
# What a relay needs of a row; payload and headers as JSON text, which envelopes embed as is.
_CLAIMED = (
    _o.c.position,
    _o.c.id,
    _o.c.event_name,
    _o.c.event_version,
    _o.c.aggregate_type,
    _o.c.aggregate_id,
    cast(_o.c.payload, Text).label("payload"),
    cast(_o.c.headers, Text).label("headers"),
    _o.c.occurred_at,
    _o.c.correlation_id,
    _o.c.causation_id,
    _o.c.tenant_id,
    _o.c.attempts,
)


def _pending(table: Any = _o) -> Any:
    return and_(table.c.published_at.is_(None), table.c.dead_at.is_(None))


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed publish does to its row: decided once, written by either batch kind.

    Attributes:
        position: the row.
        attempts: attempts so far, this one included.
        error: the error text (truncated).
        retry_at: when the row is due again (jittered exponential backoff).
        dead_at: set when ``attempts`` reached ``max_attempts``: the row is dead-lettered.
    """

    position: int
    attempts: int
    error: str
    retry_at: datetime
    dead_at: datetime | None

    @classmethod
    def of(
        cls, row: Mapping[str, Any], error: str, *, now: datetime, settings: RelaySettings
    ) -> Failure:
        """The failure of ``row`` under a relay's ``RelaySettings``."""
        attempts = int(row["attempts"]) + 1
        delay = backoff_delay(attempts, base=settings.backoff_base, maximum=settings.backoff_max)
        return cls(
            position=row["position"],
            attempts=attempts,
            error=error[:2000],
            retry_at=now + timedelta(seconds=delay),
            dead_at=now if attempts >= settings.max_attempts else None,
        )


class OutboxBatch(Protocol):
    """The statements of one relay batch, inside one transaction."""

    async def claim(self, *, batch_size: int, now: datetime) -> list[Mapping[str, Any]]:
        """Claim due rows (see :meth:`OutboxStore.claim`)."""

    async def mark_published(self, positions: Sequence[int], *, now: datetime) -> None:
        """Mark rows published."""

    async def mark_failed(self, failure: Failure) -> None:
        """Record a failed attempt."""


def backoff_delay(attempts: int, *, base: float, maximum: float) -> float:
    """Seconds before retry number ``attempts``: exponential, capped, with full jitter in
    its upper half (so relays that failed together do not retry together)."""
    ceiling = min(maximum, base * (2 ** max(attempts - 1, 0)))
    return float(ceiling * random.uniform(0.5, 1.0))


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """A snapshot of the outbox.

    Attributes:
        pending: rows not yet published and not dead.
        oldest_pending_seconds: age of the oldest pending event (0 when none).
        in_retry: pending rows that failed at least once.
        dead: dead-lettered rows.
        published_last_minute: rows published in the last 60 seconds.
    """

    pending: int
    oldest_pending_seconds: float
    in_retry: int
    dead: int
    published_last_minute: int


class OutboxStore:
    """SQL over ``qx_outbox`` for the relay and the CLI.

    Args:
        engine: the service's engine (PostgreSQL for several relays; SQLite: one relay).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.locking = engine.dialect.name == "postgresql"
        self._claim_sql: tuple[str, tuple[str, ...]] | None = None
        self._mark_sql = (
            f"UPDATE {_o.fullname} SET published_at = $1 WHERE position = ANY($2::bigint[])"
        )
        self._fail_sql = (
            f"UPDATE {_o.fullname} SET attempts = $1, last_error = $2, next_attempt_at = $3,"
            " dead_at = $4 WHERE position = $5"
        )

    async def claim(
        self, conn: AsyncConnection, *, batch_size: int, now: datetime
    ) -> list[Mapping[str, Any]]:
        """Claim up to ``batch_size`` due rows, heads first, each aggregate's rows in order.

        On PostgreSQL the heads stay locked until ``conn``'s transaction ends.
        """
        result = await conn.execute(self._claim_statement(), {"now": now, "batch": batch_size})
        return [dict(row._mapping) for row in result.all()]

    def _compiled_claim(self) -> tuple[str, tuple[str, ...]]:
        if self._claim_sql is None:
            compiled = self._claim_statement().compile(dialect=self.engine.dialect)
            self._claim_sql = (compiled.string, tuple(compiled.positiontup or ()))
        return self._claim_sql

    def _claim_statement(self) -> Any:
        now = bindparam("now", type_=_o.c.next_attempt_at.type)
        batch = bindparam("batch", type_=Integer())
        o, earlier = _o.alias("o"), _o.alias("e")
        blocked = exists(
            select(literal_column("1"))
            .where(
                earlier.c.aggregate_type == o.c.aggregate_type,
                earlier.c.aggregate_id == o.c.aggregate_id,
                earlier.c.position < o.c.position,
                _pending(earlier),
            )
            # Backwards from the row: a blocked row meets its pending predecessor first,
            # not the dead index entries of the aggregate's published rows.
            # OFFSET 0 keeps this a per-row subplan probing ix_qx_outbox_aggregate_pending.
            # Pulled up into an anti-join, PostgreSQL plans it from the table's statistics,
            # and before the first ANALYZE of a fresh outbox it scans every pending row
            # for every candidate head: quadratic, minutes for a 10,000-row backlog.
            .order_by(earlier.c.position.desc())
            .limit(literal_column("1", Integer()))
            .offset(literal_column("0", Integer()))
        )
        heads_stmt = (
            select(o.c.position, o.c.aggregate_type, o.c.aggregate_id)
            .where(
                _pending(o),
                or_(o.c.next_attempt_at.is_(None), o.c.next_attempt_at <= now),
                ~blocked,
            )
            .order_by(o.c.position)
            .limit(batch)
        )
        if self.locking:
            heads_stmt = heads_stmt.with_for_update(skip_locked=True, of=o)
        # One round trip: the locked heads, then every pending row of their aggregates.
        heads = heads_stmt.cte("heads")
        return (
            select(*_CLAIMED)
            .where(
                _pending(),
                or_(
                    tuple_(_o.c.aggregate_type, _o.c.aggregate_id).in_(
                        select(heads.c.aggregate_type, heads.c.aggregate_id).where(
                            heads.c.aggregate_id.is_not(None)
                        )
                    ),
                    _o.c.position.in_(
                        select(heads.c.position).where(heads.c.aggregate_id.is_(None))
                    ),
                ),
            )
            .order_by(_o.c.position)
            .limit(batch)
        )

    async def mark_published(
        self, conn: AsyncConnection, positions: Sequence[int], *, now: datetime
    ) -> None:
        """Mark rows published."""
        if positions:
            await conn.execute(
                update(_o)
                .where(dialect_named(self.engine.dialect.name).in_(_o.c.position, list(positions)))
                .values(published_at=now)
            )

    async def mark_failed(self, conn: AsyncConnection, failure: Failure) -> None:
        """Record a failed attempt."""
        await conn.execute(
            update(_o)
            .where(_o.c.position == failure.position)
            .values(
                attempts=failure.attempts,
                last_error=failure.error,
                next_attempt_at=failure.retry_at,
                dead_at=failure.dead_at,
            )
        )

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[OutboxBatch]:
        """One relay batch's transaction: ``claim`` → ``mark_published`` / ``mark_failed``
        → COMMIT on leaving (ROLLBACK on error).

        On PostgreSQL the batch runs on the asyncpg connection itself with statements
        compiled once: the relay's hot path skips SQLAlchemy's per-statement work.
        """
        if not self.locking:
            async with self.engine.begin() as conn:
                yield _CoreBatch(self, conn)
            return
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            try:
                async with driver.transaction():
                    yield _DriverBatch(self, driver)
            except BaseException:
                # SQLAlchemy did not see this connection fail; never pool it again.
                await conn.invalidate()
                raise

    async def status(self, *, now: datetime) -> OutboxStatus:
        """Counts for ``qx outbox status``."""
        pending = _pending()
        stmt = select(
            func.count().filter(pending),
            func.min(_o.c.occurred_at).filter(pending),
            func.count().filter(and_(pending, _o.c.attempts > 0)),
            func.count().filter(_o.c.dead_at.is_not(None)),
            func.count().filter(_o.c.published_at >= now - timedelta(minutes=1)),
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).one()
        oldest = row[1]
        return OutboxStatus(
            pending=int(row[0]),
            oldest_pending_seconds=max((now - oldest).total_seconds(), 0.0) if oldest else 0.0,
            in_retry=int(row[2]),
            dead=int(row[3]),
            published_last_minute=int(row[4]),
        )

    async def requeue(
        self,
        *,
        now: datetime,
        ids: Sequence[UUID] | None = None,
        event_name: str | None = None,
    ) -> int:
        """Revive dead rows (all, or those with these ids / this event name)."""
        stmt = update(_o).where(_o.c.dead_at.is_not(None))
        if ids:
            stmt = stmt.where(_o.c.id.in_(list(ids)))
        if event_name:
            stmt = stmt.where(_o.c.event_name == event_name)
        stmt = stmt.values(dead_at=None, attempts=0, last_error=None, next_attempt_at=now)
        async with self.engine.begin() as conn:
            return int((await conn.execute(stmt)).rowcount)

    async def purge(self, *, older_than: datetime, batch_size: int) -> int:
        """Delete published rows older than ``older_than``, ``batch_size`` per statement
        (each its own short transaction)."""
        total = 0
        while True:
            victims = (
                select(_o.c.position)
                .where(_o.c.published_at.is_not(None), _o.c.published_at < older_than)
                .order_by(_o.c.position)
                .limit(batch_size)
            )
            async with self.engine.begin() as conn:
                deleted = int(
                    (await conn.execute(delete(_o).where(_o.c.position.in_(victims)))).rowcount
                )
            total += deleted
            if deleted < batch_size:
                return total


class _CoreBatch:
    """A batch through SQLAlchemy Core (SQLite)."""

    def __init__(self, store: OutboxStore, conn: AsyncConnection) -> None:
        self.store, self.conn = store, conn

    async def claim(self, *, batch_size: int, now: datetime) -> list[Mapping[str, Any]]:
        return await self.store.claim(self.conn, batch_size=batch_size, now=now)

    async def mark_published(self, positions: Sequence[int], *, now: datetime) -> None:
        await self.store.mark_published(self.conn, positions, now=now)

    async def mark_failed(self, failure: Failure) -> None:
        await self.store.mark_failed(self.conn, failure)


class _DriverBatch:
    """A batch on the asyncpg connection (PostgreSQL), statements compiled once."""

    def __init__(self, store: OutboxStore, driver: Any) -> None:
        self.store, self.driver = store, driver

    async def claim(self, *, batch_size: int, now: datetime) -> list[Mapping[str, Any]]:
        sql, order = self.store._compiled_claim()
        params = {"now": now, "batch": batch_size}
        return list(await self.driver.fetch(sql, *(params[name] for name in order)))

    async def mark_published(self, positions: Sequence[int], *, now: datetime) -> None:
        if positions:
            await self.driver.execute(self.store._mark_sql, now, list(positions))

    async def mark_failed(self, failure: Failure) -> None:
        await self.driver.execute(
            self.store._fail_sql,
            failure.attempts,
            failure.error,
            failure.retry_at,
            failure.dead_at,
            failure.position,
        )
