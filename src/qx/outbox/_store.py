"""The relay's SQL: lane leases, claims, marks, and the operator's view of the outbox.

Every statement here runs in a short transaction; none spans broker I/O.

- **Leases.** A relay heartbeats in ``qx_outbox_relay`` and holds a fair share of the
  :data:`~qx.outbox._table.OUTBOX_LANES` lanes in ``qx_outbox_lane`` (owner, lease
  deadline, fencing token). Taking a lane bumps its token; a claim or a mark is accepted only
  under the token the relay holds, so a relay that lost a lane while it was away can change
  nothing in it.
- **Claims.** Lane by lane, a relay reads the first ready rows (``next_attempt_at`` NULL)
  and the deferred rows now due, each through its partial index, and takes per aggregate the
  run that starts at the aggregate's head: a row is taken only when the nearest earlier
  unpublished row of its aggregate is the row taken before it. Taken rows are not written:
  the lane is the lease, and the relay passes over the rows it has in flight, so a relay
  that dies costs its peers one lane lease. Rows behind a run in flight, in retry or parked
  are deferred to when it can move, so no later claim reads them again: a claim reads about
  ``batch_size`` rows whatever the backlog, the number of relays, or the number of blocked
  aggregates.
- **Marks.** Published rows with their numbers (each aggregate's last number moves with
  them, so a row published again after a crash keeps its number); failed heads (retry
  later, or dead, which parks the rest of the aggregate unless its event may be published
  past); and, for every aggregate whose run went out whole, its deferred followers made
  ready again.

Example:
    >>> store = OutboxStore(engine)                                   # doctest: +SKIP
    >>> leases = await store.lease("relay-1", busy=set(), now=utcnow(),
    ...                            lease_seconds=30)                  # doctest: +SKIP
    >>> claim = await store.claim("relay-1", leases.tokens, batch_size=200,
    ...                           now=utcnow(), lease_seconds=30)     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

from sqlalchemy import (
    and_,
    delete,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from qx.core._backoff import Backoff
from qx.db._dialect import dialect_named
from qx.db._dialect_base import Dialect
from qx.outbox._claimed import AggregateKey, ClaimedRow, Run, sequence_key
from qx.outbox._leases import LeaseBook, Leases
from qx.outbox._relay_sql import PENDING, RelaySql, SequenceKey
from qx.outbox._relay_sql_postgres import PostgresRelaySql
from qx.outbox._relay_sql_sqlite import SqliteRelaySql
from qx.outbox._table import (
    OUTBOX_LANES,
    PARKED,
    lane_table,
    outbox_table,
    relay_table,
)
from qx.outbox._tx import Tx, terminate
from qx.settings import RelaySettings

__all__ = [
    "Claim",
    "Failure",
    "Finished",
    "Marks",
    "OutboxProblem",
    "OutboxStatus",
    "OutboxStore",
    "Sent",
    "reconnect_backoff",
    "relay_server_settings",
    "retry_backoff",
]

# The relay's statements, one strategy per backend (each names its own).
_RELAY_SQL: dict[str, type[RelaySql]] = {
    sql.backend: sql for sql in (PostgresRelaySql, SqliteRelaySql)
}


def relay_sql(dialect: Dialect, sa_dialect: Any) -> RelaySql:
    """The relay's statements for ``dialect`` (compiled for ``sa_dialect``)."""
    return _RELAY_SQL[dialect.name](sa_dialect)


_o = outbox_table
_lane = lane_table


def retry_backoff(settings: RelaySettings) -> Backoff:
    """How long a failed message waits before its next attempt (jittered: relays that
    failed together do not retry together)."""
    return Backoff(settings.backoff_base, settings.backoff_max)


def reconnect_backoff(settings: RelaySettings) -> Backoff:
    """How long to wait after failures in a row to reach the database or the broker:
    doubling from ``reconnect_delay``, at most 30 s, not jittered (one relay's own pace)."""
    return Backoff(settings.reconnect_delay, 30.0, jitter=False)


class Sent(NamedTuple):
    """A row the broker acknowledged."""

    lane: int
    position: int
    key: AggregateKey | None
    seq: int | None


class Finished(NamedTuple):
    """An aggregate's run that went out whole, up to ``last``."""

    lane: int
    key: AggregateKey
    last: int


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed publish of an aggregate's head, and what it does to the rest of its run.

    Attributes:
        row: the row that failed.
        attempts: attempts so far, this one included.
        error: the error text (truncated).
        retry_at: when the row is due again.
        dead: the row reached ``max_attempts`` and is dead-lettered.
        parks: a dead row parks the rest of its aggregate (unless its event may be
            published past).
        behind: positions of the run's rows after it, not sent.
    """

    row: ClaimedRow
    attempts: int
    error: str
    retry_at: datetime
    dead: bool
    parks: bool
    behind: tuple[int, ...] = ()


@dataclass(slots=True)
class Marks:
    """What a relay reports back about rows it claimed, per lane (see :meth:`OutboxStore.record`).

    Attributes:
        published: rows the broker acknowledged.
        failed: failed heads.
        finished: runs that went out whole.
    """

    published: list[Sent] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.published or self.failed or self.finished)

    def __len__(self) -> int:
        return len(self.published) + len(self.failed)

    def take(self) -> Marks:
        """Move everything into a new ``Marks`` (this one is left empty)."""
        taken = Marks(self.published, self.failed, self.finished)
        self.published, self.failed, self.finished = [], [], []
        return taken

    def put_back(self, taken: Marks) -> None:
        """Return marks that could not be written, ahead of those gathered since."""
        self.published[:0] = taken.published
        self.failed[:0] = taken.failed
        self.finished[:0] = taken.finished

    def lanes(self) -> set[int]:
        """Every lane these marks touch."""
        found = {p.lane for p in self.published}
        found.update(f.row.lane for f in self.failed)
        found.update(f.lane for f in self.finished)
        return found


@dataclass(slots=True)
class Claim:
    """Rows leased to a relay by one claim.

    Attributes:
        runs: per aggregate, its rows in publishing order (a row without aggregate alone).
        tokens: the fencing token of every lane the runs belong to.
        rows: number of rows.
    """

    runs: list[Run]
    tokens: dict[int, int]

    @property
    def rows(self) -> int:
        return sum(len(run) for run in self.runs)


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """A snapshot of the outbox.

    Attributes:
        pending: rows not yet published and not dead.
        oldest_pending_seconds: age of the oldest pending event (0 when none).
        in_retry: pending rows that failed at least once.
        dead: dead-lettered rows.
        parked: pending rows parked behind a dead row of their aggregate.
        published_last_minute: rows published in the last 60 seconds.
        relays: relays alive.
    """

    pending: int
    oldest_pending_seconds: float
    in_retry: int
    dead: int
    parked: int
    published_last_minute: int
    relays: int = 0


@dataclass(frozen=True, slots=True)
class OutboxProblem:
    """A dead or parked row, for the operator.

    Attributes:
        state: ``"dead"`` or ``"parked"``.
        id: the event id.
        position: the outbox position.
        aggregate: ``type/id`` or ``None``.
        event_name: the event's wire name.
        attempts: publish attempts made.
        last_error: the last publish error (``None`` for parked rows never tried).
    """

    state: str
    id: UUID
    position: int
    aggregate: str | None
    event_name: str
    attempts: int
    last_error: str | None


class OutboxStore:
    """SQL over qx's outbox tables for the relay and the CLI.

    Args:
        engine: the service's engine (PostgreSQL for several relays; SQLite: one relay).
        timeout: seconds any one transaction may take, connecting included; past it the
            connection is closed without a round trip and the call raises ``TimeoutError``.
            ``None``: no limit (the CLI). The server-side limits of the relay's own
            connections are :func:`relay_server_settings`.
    """

    def __init__(self, engine: AsyncEngine, *, timeout: float | None = None) -> None:
        self.engine = engine
        self.dialect: Dialect = dialect_named(engine.dialect.name)
        self.timeout = timeout
        self._leases = LeaseBook(lane_table, relay_table, "relay_id", OUTBOX_LANES)
        self.sql: RelaySql = relay_sql(self.dialect, engine.dialect)
        self._rotation = 0

    # -- transactions ----------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        """A pooled connection and its driver connection, bounded by ``timeout``. On any
        error the socket is closed at once and the connection never pooled again: it may
        be dead, and cleaning up over a dead socket would hang."""
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(asyncio.timeout(self.timeout))
            conn = await stack.enter_async_context(self.engine.connect())
            raw = await conn.get_raw_connection()
            try:
                yield conn, raw.driver_connection
            except BaseException:
                terminate(raw)
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One short transaction through SQLAlchemy, bounded by ``timeout``."""
        async with self._connection() as (conn, _driver):
            await conn.begin()
            yield conn
            await conn.commit()

    @asynccontextmanager
    async def hot(self) -> AsyncIterator[Tx]:
        """One short transaction of the relay's hot path, bounded by ``timeout``, of the
        backend's own kind (see :class:`~qx.outbox._relay_sql.RelaySql`)."""
        async with (
            self._connection() as (conn, driver),
            self.sql.transaction(conn, driver) as tx,
        ):
            yield tx

    @asynccontextmanager
    async def _using(self, tx: Tx | None) -> AsyncIterator[Tx]:
        if tx is not None:
            yield tx
            return
        async with self.hot() as own:
            yield own

    # -- leases ----------------------------------------------------------------------------

    async def lease(
        self,
        relay_id: str,
        *,
        busy: set[int],
        now: datetime,
        lease_seconds: float,
    ) -> Leases:
        """Heartbeat, renew this relay's lanes and move towards a fair share of them.

        A relay holding more than its share gives up its highest lanes, each once it has
        no rows in flight there (until then they are *draining*: not claimed in).

        Args:
            relay_id: this relay.
            busy: lanes with rows in flight.
            now: the time.
            lease_seconds: how long a lease lasts without renewal.
        """
        async with self.transaction() as conn:
            return await self._leases.lease(
                conn, self.dialect, relay_id, busy=busy, now=now, lease_seconds=lease_seconds
            )

    async def release(self, relay_id: str) -> None:
        """Give up every lane and the heartbeat (a relay that stops cleanly)."""
        async with self.transaction() as conn:
            await self._leases.release(conn, relay_id)

    async def _valid(
        self, tx: Tx, relay_id: str, tokens: Mapping[int, int], now: datetime | None
    ) -> set[int]:
        """The lanes of ``tokens`` still this relay's under the same token (locked shared
        on PostgreSQL, so nobody takes them until the transaction ends); with ``now``, only
        those whose lease has not run out."""
        if not tokens:
            return set()
        found = await self.sql.fenced(tx, lanes=sorted(tokens), relay=relay_id, live_at=now)
        return {lane for lane, token in found.items() if tokens.get(lane) == token}

    # -- claims ----------------------------------------------------------------------------

    async def claim(
        self,
        relay_id: str,
        tokens: Mapping[int, int],
        *,
        batch_size: int,
        now: datetime,
        lease_seconds: float,
        exclude: set[int] | frozenset[int] = frozenset(),
        run_length: int = 16,
        skip: Collection[int] = (),
        tx: Tx | None = None,
    ) -> Claim:
        """Lease up to ``batch_size`` rows of this relay's lanes, each aggregate's from its head.

        Args:
            relay_id: this relay.
            tokens: the lanes it holds, with their fencing tokens.
            batch_size: rows to take at most.
            now: the time.
            lease_seconds: the claimed rows' in-flight deadline from ``now``.
            exclude: lanes not to claim in (being handed over).
            run_length: rows of one aggregate taken beyond those the claim read, at most:
                an aggregate's rows go out in one run instead of waiting for later claims.
            skip: positions in flight at this relay (claimed earlier, not yet recorded):
                not read again, and rows behind them wait until their run is recorded.
            tx: run inside this transaction (of :meth:`hot`) instead of a new one.
        """
        lanes = sorted(set(tokens) - set(exclude))
        if not lanes:
            return Claim([], {})
        until = now + timedelta(seconds=lease_seconds)
        async with self._using(tx) as tx:
            valid = await self._valid(tx, relay_id, {k: tokens[k] for k in lanes}, now)
            if not valid:
                return Claim([], {})
            flying = set(skip)
            # A different first lane each claim, so no lane waits behind a busy one.
            order = sorted(valid)
            self._rotation = (self._rotation + 1) % len(order)
            order = order[self._rotation :] + order[: self._rotation]
            rows: dict[int, ClaimedRow] = {}
            for due in (False, True):
                found = await self.sql.candidates(
                    tx, due=due, lanes=order, skip=sorted(flying), now=now, batch=batch_size
                )
                rows.update((row.position, row) for row in found)
            runs, blocked = _runs(sorted(rows.values(), key=lambda r: r.position))
            pending = sorted(blocked - flying)
            states = await self.sql.row_states(tx, pending) if pending else {}
            heads: list[Run] = []
            deferrals: dict[datetime, list[int]] = {}
            for run in runs:
                blocker = run[0].blocker
                if blocker is None:
                    heads.append(run)
                elif blocker in flying:
                    # Behind a run in flight here: out of the way until it is recorded
                    # (which makes it ready again), or its lease ends.
                    deferrals.setdefault(until, []).extend(r.position for r in run)
                    continue
                else:
                    state = states.get(blocker)
                    if state is None:
                        continue  # its blocker is gone since: read again next time
                    if state.dead_at is not None and state.next_attempt_at != PARKED:
                        heads.append(run)  # published past its dead predecessor
                    else:
                        if state.dead_at is not None:
                            deferrals.setdefault(PARKED, []).extend(r.position for r in run)
                        elif state.next_attempt_at is not None and state.next_attempt_at > now:
                            deferrals.setdefault(state.next_attempt_at, []).extend(
                                r.position for r in run
                            )
                        continue
                if len(heads) >= batch_size:
                    break
            taken = await self._extend(tx, heads, batch_size=batch_size, run_length=run_length)
            taken = await self._number(tx, taken)
            claimed = {row.position for run in taken for row in run}
            for at, positions in deferrals.items():
                left = [p for p in positions if p not in claimed]
                if left:
                    await self.sql.defer(tx, left, until=at)
        return Claim(taken, {lane: tokens[lane] for lane in valid})

    async def _extend(
        self, tx: Tx, heads: list[Run], *, batch_size: int, run_length: int
    ) -> list[Run]:
        """Lengthen each run with its aggregate's next open rows (through the per-aggregate
        index), stopping at a dead or parked row, until ``batch_size`` rows are taken."""
        # Lengthen only as many runs as could fill the batch if each got ``run_length``.
        room, short = batch_size, []
        for run in heads:
            if room <= 0:
                break
            room -= max(len(run), run_length)
            if run[0].aggregate_id is not None and len(run) < run_length:
                short.append(run)
        following: dict[int, Run] = {}
        if short and run_length > 1:
            following = await self.sql.followers(tx, short, per=run_length)
        taken: list[Run] = []
        count = 0
        for run in heads:
            if count >= batch_size:
                break
            run = list(run)
            for row in following.get(run[0].position, ()):
                if len(run) >= run_length:
                    break
                if row.dead_at is not None or (
                    row.next_attempt_at is not None and row.next_attempt_at >= PARKED
                ):
                    break
                if row.position > run[-1].position:
                    run.append(row)
            run = run[: batch_size - count]
            count += len(run)
            taken.append(run)
        return taken

    async def _number(self, tx: Tx, runs: list[Run]) -> list[Run]:
        """The runs, each aggregate's rows numbered after the last number it published.

        Nothing is written: the last number moves when rows are marked published, so a row
        published again after a crash carries the number it went out with before.
        """
        keys = sorted({sequence_key(run[0].key) for run in runs if run[0].key is not None})
        if not keys:
            return runs
        last = await self.sql.last_numbers(tx, keys)
        numbered: list[Run] = []
        for run in runs:
            key = run[0].key
            if key is None:
                numbered.append(run)
                continue
            top = last.get(sequence_key(key), 0)
            numbered.append([row.numbered(top + n) for n, row in enumerate(run, start=1)])
        return numbered

    # -- marks -----------------------------------------------------------------------------

    async def record(
        self,
        relay_id: str,
        tokens: Mapping[int, int],
        marks: Marks,
        *,
        now: datetime,
        tx: Tx | None = None,
    ) -> set[int]:
        """Write what the relay did with claimed rows, in lanes still its own (inside
        ``tx`` when given).

        Returns:
            The lanes the marks were refused in (lost to another relay: its claims publish
            those rows again).
        """
        lanes = marks.lanes()
        async with self._using(tx) as tx:
            valid = await self._valid(
                tx, relay_id, {k: v for k, v in tokens.items() if k in lanes}, None
            )
            published = [m for m in marks.published if m.lane in valid]
            if published:
                await self._published(tx, published, now=now)
            finished = {f.key for f in marks.finished if f.lane in valid}
            for failure in marks.failed:
                if failure.row.lane not in valid:
                    continue
                await self._fail(tx, failure, now=now)
                if failure.dead and not failure.parks and failure.row.key is not None:
                    finished.add(failure.row.key)
            if finished:
                # Every claimed row of these aggregates went out (or died without parking),
                # so whatever of theirs is still deferred waited behind those rows: ready.
                # (An aggregate is in one run of one relay at a time.)
                await self.sql.unblock(tx, sorted(sequence_key(k) for k in finished))
        return lanes - valid

    async def _published(self, tx: Tx, marks: list[Sent], *, now: datetime) -> None:
        """Mark rows published with their numbers, and move each aggregate's last number."""
        top: dict[SequenceKey, int] = {}
        for mark in marks:
            if mark.key is not None and mark.seq is not None:
                k = sequence_key(mark.key)
                top[k] = max(top.get(k, 0), mark.seq)
        await self.sql.mark_published(tx, [(m.position, m.seq) for m in marks], now=now)
        if top:
            await self.sql.advance(tx, top)

    async def _fail(self, tx: Tx, failure: Failure, *, now: datetime) -> None:
        row = failure.row
        passed = failure.dead and not failure.parks
        await self.sql.fail(
            tx,
            position=row.position,
            attempts=failure.attempts,
            error=failure.error,
            # A dead row's own next_attempt_at says whether it parks its aggregate, so
            # every relay reads the decision the same way.
            retry_at=(PARKED if failure.parks else None) if failure.dead else failure.retry_at,
            dead_at=now if failure.dead else None,
            # Published past, it keeps its number: consumers see the gap it leaves.
            number=row.aggregate_seq if passed else None,
        )
        key = row.key
        if passed and key is not None and row.aggregate_seq is not None:
            await self.sql.advance(tx, {sequence_key(key): row.aggregate_seq})
        if failure.dead and failure.parks and key is not None:
            # Everything after a dead head waits for the operator, in order.
            await self.sql.park(tx, key, after=row.position)
        elif not failure.dead and failure.behind:
            await self.sql.defer(tx, failure.behind, until=failure.retry_at)

    # -- the operator's view ---------------------------------------------------------------

    async def status(self, *, now: datetime) -> OutboxStatus:
        """Counts for ``qx outbox status``."""
        pending = PENDING
        stmt = select(
            func.count().filter(pending),
            func.min(_o.c.occurred_at).filter(pending),
            func.count().filter(and_(pending, _o.c.attempts > 0)),
            func.count().filter(_o.c.dead_at.is_not(None)),
            func.count().filter(and_(pending, _o.c.next_attempt_at >= PARKED)),
            func.count().filter(_o.c.published_at >= now - timedelta(minutes=1)),
        )
        async with self.transaction() as conn:
            row = (await conn.execute(stmt)).one()
            relays = await conn.scalar(select(func.count()).where(relay_table.c.alive_until > now))
        oldest = row[1]
        return OutboxStatus(
            pending=int(row[0]),
            oldest_pending_seconds=max((now - oldest).total_seconds(), 0.0) if oldest else 0.0,
            in_retry=int(row[2]),
            dead=int(row[3]),
            parked=int(row[4]),
            published_last_minute=int(row[5]),
            relays=int(relays or 0),
        )

    async def problems(self, *, limit: int = 100) -> list[OutboxProblem]:
        """Dead and parked rows, oldest first (at most ``limit`` of each)."""
        columns = (
            _o.c.id,
            _o.c.position,
            _o.c.aggregate_type,
            _o.c.aggregate_id,
            _o.c.event_name,
            _o.c.attempts,
            _o.c.last_error,
        )
        found: list[OutboxProblem] = []
        async with self.transaction() as conn:
            for state, where in (
                ("dead", _o.c.dead_at.is_not(None)),
                ("parked", and_(PENDING, _o.c.next_attempt_at >= PARKED)),
            ):
                result = await conn.execute(
                    select(*columns).where(where).order_by(_o.c.position).limit(limit)
                )
                for row in result.mappings():
                    aggregate = (
                        None
                        if row["aggregate_id"] is None
                        else f"{row['aggregate_type']}/{row['aggregate_id']}"
                    )
                    found.append(
                        OutboxProblem(
                            state=state,
                            id=row["id"],
                            position=int(row["position"]),
                            aggregate=aggregate,
                            event_name=row["event_name"],
                            attempts=int(row["attempts"]),
                            last_error=row["last_error"],
                        )
                    )
        return found

    async def requeue(
        self,
        *,
        now: datetime,
        ids: Sequence[UUID] | None = None,
        event_name: str | None = None,
    ) -> int:
        """Revive dead rows (all, or those with these ids / this event name) and unpark the
        rows of their aggregates, which then follow them in order."""
        stmt = update(_o).where(_o.c.dead_at.is_not(None))
        if ids:
            stmt = stmt.where(_o.c.id.in_(list(ids)))
        if event_name:
            stmt = stmt.where(_o.c.event_name == event_name)
        stmt = stmt.values(dead_at=None, attempts=0, last_error=None, next_attempt_at=None)
        async with self.transaction() as conn:
            revived = (
                await conn.execute(stmt.returning(_o.c.aggregate_type, _o.c.aggregate_id))
            ).all()
            keys = {(t, i) for t, i in revived if i is not None}
            if keys:
                await conn.execute(
                    update(_o)
                    .where(
                        tuple_(_o.c.aggregate_type, _o.c.aggregate_id).in_(sorted(keys)),
                        PENDING,
                        _o.c.next_attempt_at >= PARKED,
                    )
                    .values(next_attempt_at=None)
                )
        return len(revived)

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
            async with self.transaction() as conn:
                deleted = int(
                    (await conn.execute(delete(_o).where(_o.c.position.in_(victims)))).rowcount
                )
            total += deleted
            if deleted < batch_size:
                return total


def _runs(rows: list[ClaimedRow]) -> tuple[list[Run], set[int]]:
    """Split candidate rows (in position order) into runs: per aggregate, rows each of whose
    nearest earlier unpublished row is the row before it. Only an aggregate's first run can
    start at its head; the others wait behind rows this claim did not read.

    Returns:
        The first run of every aggregate (rows without aggregate: one run each), in order of
        their first position, and the blockers of those whose first row is not a head.
    """
    by_key: dict[AggregateKey | int, list[Run]] = {}
    for row in rows:
        key = row.key
        if key is None:
            by_key[row.position] = [[row]]
            continue
        runs = by_key.setdefault(key, [])
        if runs and row.blocker == runs[-1][-1].position:
            runs[-1].append(row)
        else:
            runs.append([row])
    result: list[Run] = []
    blocked: set[int] = set()
    for runs in by_key.values():
        result.extend(runs)
        blocked.update(run[0].blocker for run in runs if run[0].blocker is not None)
    result.sort(key=lambda run: run[0].position)
    return result, blocked


def relay_server_settings(timeout: float) -> dict[str, str]:
    """PostgreSQL session settings for a relay's connections: statements and idle
    transactions end after ``timeout`` seconds, and TCP keepalives find a peer that is gone,
    so the server drops the session of a relay it can no longer reach."""
    millis = str(max(int(timeout * 1000), 1))
    probe = str(max(int(timeout / 3), 1))
    return {
        "statement_timeout": millis,
        "idle_in_transaction_session_timeout": millis,
        "tcp_keepalives_idle": probe,
        "tcp_keepalives_interval": probe,
        "tcp_keepalives_count": "3",
    }
