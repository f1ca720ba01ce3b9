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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import and_, delete, exists, func, literal, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from qx.outbox.table import outbox_table

__all__ = ["OutboxStatus", "OutboxStore", "backoff_delay"]

_o = outbox_table


def _pending(table: Any = _o) -> Any:
    return and_(table.c.published_at.is_(None), table.c.dead_at.is_(None))


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

    async def claim(
        self, conn: AsyncConnection, *, batch_size: int, now: datetime
    ) -> list[Mapping[str, Any]]:
        """Claim up to ``batch_size`` due rows, heads first, each aggregate's rows in order.

        On PostgreSQL the heads stay locked until ``conn``'s transaction ends.
        """
        o, earlier = _o.alias("o"), _o.alias("e")
        blocked = exists(
            select(literal(1)).where(
                earlier.c.aggregate_type == o.c.aggregate_type,
                earlier.c.aggregate_id == o.c.aggregate_id,
                earlier.c.position < o.c.position,
                _pending(earlier),
            )
        )
        heads_stmt = (
            select(o.c.position, o.c.aggregate_type, o.c.aggregate_id)
            .where(
                _pending(o),
                or_(o.c.next_attempt_at.is_(None), o.c.next_attempt_at <= now),
                ~blocked,
            )
            .order_by(o.c.position)
            .limit(batch_size)
        )
        if self.locking:
            heads_stmt = heads_stmt.with_for_update(skip_locked=True, of=o)
        heads = (await conn.execute(heads_stmt)).all()
        if not heads:
            return []
        keys = list(
            {(h.aggregate_type, h.aggregate_id) for h in heads if h.aggregate_id is not None}
        )
        loose = [h.position for h in heads if h.aggregate_id is None]
        clauses = []
        if keys:
            clauses.append(tuple_(_o.c.aggregate_type, _o.c.aggregate_id).in_(keys))
        if loose:
            clauses.append(_o.c.position.in_(loose))
        rows_stmt = (
            select(_o).where(_pending(), or_(*clauses)).order_by(_o.c.position).limit(batch_size)
        )
        result = await conn.execute(rows_stmt)
        return [dict(row._mapping) for row in result.all()]

    async def mark_published(
        self, conn: AsyncConnection, positions: Sequence[int], *, now: datetime
    ) -> None:
        """Mark rows published."""
        if positions:
            await conn.execute(
                update(_o).where(_o.c.position.in_(list(positions))).values(published_at=now)
            )

    async def mark_failed(
        self,
        conn: AsyncConnection,
        row: Mapping[str, Any],
        error: str,
        *,
        now: datetime,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
    ) -> bool:
        """Record a failed attempt; return whether the row is now dead-lettered."""
        attempts = int(row["attempts"]) + 1
        dead = attempts >= max_attempts
        delay = backoff_delay(attempts, base=backoff_base, maximum=backoff_max)
        await conn.execute(
            update(_o)
            .where(_o.c.position == row["position"])
            .values(
                attempts=attempts,
                last_error=error[:2000],
                next_attempt_at=now + timedelta(seconds=delay),
                dead_at=now if dead else None,
            )
        )
        return dead

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
