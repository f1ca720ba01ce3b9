"""The relay's SQL: lane leases, claims, marks, and the operator's view of the outbox.

Every statement here runs in a short transaction of its own; none spans broker I/O.

- **Leases.** A relay heartbeats in ``qx_outbox_relay`` and holds a fair share of the
  :data:`~qx.outbox._table.OUTBOX_LANES` lanes in ``qx_outbox_lane`` (owner, lease
  deadline, fencing token). Taking a lane bumps its token; a claim or a mark is accepted only
  under the token the relay holds, so a relay that lost a lane while it was away can change
  nothing in it.
- **Claims.** In its own lanes a relay reads the first ready rows (``next_attempt_at`` NULL)
  and the deferred rows now due, each through its partial index, and takes per aggregate the
  run that starts at the aggregate's head: a row is taken only when the nearest earlier
  unpublished row of its aggregate is the row taken before it. Taken rows are deferred until
  the claim's in-flight deadline (a crash costs a lease period, not a lock). Rows behind an
  aggregate that is in flight, in retry or parked are deferred to when it can move, so no
  later claim reads them again: a claim reads about ``batch_size`` rows whatever the
  backlog, the number of relays, or the number of blocked aggregates.
- **Marks.** Published rows; failed heads (retry later, or dead, which parks the rest of
  the aggregate unless its event may be published past); rows given back untried (broker
  unavailable, shutdown); and, for every aggregate whose run went out whole, its deferred
  followers made ready again.

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
import math
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import (
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from qx.db._dialect import Dialect, dialect_named
from qx.outbox._table import (
    OUTBOX_LANES,
    PARKED,
    lane_table,
    outbox_table,
    relay_table,
    sequence_table,
)

__all__ = [
    "Claim",
    "Failure",
    "Leases",
    "Marks",
    "OutboxProblem",
    "OutboxStatus",
    "OutboxStore",
    "backoff_delay",
]

_o = outbox_table
_lane = lane_table
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
    _o.c.lane,
    _o.c.aggregate_seq,
)
_PENDING = and_(_o.c.published_at.is_(None), _o.c.dead_at.is_(None))

AggregateKey = tuple[str | None, str]


def _aggregate(row: Mapping[str, Any]) -> AggregateKey | None:
    return None if row["aggregate_id"] is None else (row["aggregate_type"], row["aggregate_id"])


def backoff_delay(attempts: int, *, base: float, maximum: float) -> float:
    """Seconds before retry number ``attempts``: exponential, capped, with full jitter in
    its upper half (so relays that failed together do not retry together)."""
    ceiling = min(maximum, base * (2 ** max(attempts - 1, 0)))
    return float(ceiling * random.uniform(0.5, 1.0))


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

    row: Mapping[str, Any]
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
        published: ``(lane, position)`` of rows the broker acknowledged.
        failed: failed heads.
        released: ``(lane, position)`` of rows given back untried (no attempt counted).
        finished: ``(lane, aggregate, last position)`` of runs that went out whole.
    """

    published: list[tuple[int, int]] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    released: list[tuple[int, int]] = field(default_factory=list)
    finished: list[tuple[int, AggregateKey, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.published or self.failed or self.released or self.finished)

    def take(self) -> Marks:
        """Move everything into a new ``Marks`` (this one is left empty)."""
        taken = Marks(self.published, self.failed, self.released, self.finished)
        self.published, self.failed, self.released, self.finished = [], [], [], []
        return taken

    def lanes(self) -> set[int]:
        """Every lane these marks touch."""
        found = {lane for lane, _ in self.published} | {lane for lane, _ in self.released}
        found.update(f.row["lane"] for f in self.failed)
        found.update(lane for lane, _, _ in self.finished)
        return found


@dataclass(slots=True)
class Claim:
    """Rows leased to a relay by one claim.

    Attributes:
        runs: per aggregate, its rows in publishing order (a row without aggregate alone).
        tokens: the fencing token of every lane the runs belong to.
        rows: number of rows.
    """

    runs: list[list[dict[str, Any]]]
    tokens: dict[int, int]

    @property
    def rows(self) -> int:
        return sum(len(run) for run in self.runs)


@dataclass(frozen=True, slots=True)
class Leases:
    """The lanes a relay holds after :meth:`OutboxStore.lease`.

    Attributes:
        tokens: lane → fencing token.
        draining: lanes being handed over: not claimed in, given up once idle.
    """

    tokens: dict[int, int]
    draining: frozenset[int] = frozenset()


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


def _terminate(raw: Any) -> None:
    """Close a driver connection's socket at once, without a round trip."""
    driver = getattr(raw, "driver_connection", None)
    terminate = getattr(driver, "terminate", None)
    if terminate is not None:
        with contextlib.suppress(Exception):
            terminate()


class OutboxStore:
    """SQL over qx's outbox tables for the relay and the CLI.

    Args:
        engine: the service's engine (PostgreSQL for several relays; SQLite: one relay).
        timeout: seconds any one transaction may take, connecting included; past it the
            connection is closed without a round trip and the call raises ``TimeoutError``.
            ``None``: no limit (the CLI).
        server_timeouts: on PostgreSQL, also set ``statement_timeout``,
            ``idle_in_transaction_session_timeout`` and TCP keepalives for each transaction,
            so the server ends the session of a relay it cannot reach.
    """

    def __init__(
        self, engine: AsyncEngine, *, timeout: float | None = None, server_timeouts: bool = True
    ) -> None:
        self.engine = engine
        self.dialect: Dialect = dialect_named(engine.dialect.name)
        self.locking = self.dialect.locks_rows
        self.timeout = timeout
        self._server_timeouts = server_timeouts and self.locking and timeout is not None
        self._lanes_created = False

    # -- transactions ----------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One short transaction, bounded by ``timeout``."""
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(asyncio.timeout(self.timeout))
            conn = await stack.enter_async_context(self.engine.connect())
            raw = await conn.get_raw_connection()
            try:
                await conn.begin()
                if self._server_timeouts:
                    await conn.execute(self._session_limits())
                yield conn
                await conn.commit()
            except BaseException:
                # Whatever went wrong, the socket may be dead: cleaning up over it would hang.
                _terminate(raw)
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise

    def _session_limits(self) -> Any:
        limit = f"{max(int((self.timeout or 30) * 1000), 1)}ms"
        keepalive = str(max(int((self.timeout or 30) / 3), 1))
        return select(
            func.set_config("statement_timeout", limit, True),
            func.set_config("idle_in_transaction_session_timeout", limit, True),
            func.set_config("tcp_keepalives_idle", keepalive, False),
            func.set_config("tcp_keepalives_interval", keepalive, False),
            func.set_config("tcp_keepalives_count", "3", False),
        )

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
        until = now + timedelta(seconds=lease_seconds)
        async with self.transaction() as conn:
            if not self._lanes_created:
                await conn.execute(
                    self.dialect.insert(_lane)
                    .values([{"lane": lane, "token": 0} for lane in range(OUTBOX_LANES)])
                    .on_conflict_do_nothing()
                )
                self._lanes_created = True
            beat = self.dialect.insert(relay_table).values(relay_id=relay_id, alive_until=until)
            await conn.execute(
                beat.on_conflict_do_update(
                    index_elements=[relay_table.c.relay_id], set_={"alive_until": until}
                )
            )
            renewed = await conn.execute(
                update(_lane)
                .where(_lane.c.owner == relay_id)
                .values(lease_until=until)
                .returning(_lane.c.lane, _lane.c.token)
            )
            mine = {int(lane): int(token) for lane, token in renewed.all()}
            draining: set[int] = set()
            alive = await conn.scalar(select(func.count()).where(relay_table.c.alive_until > now))
            fair = math.ceil(OUTBOX_LANES / max(int(alive or 1), 1))
            if len(mine) > fair:
                surplus = sorted(mine)[fair:]
                release = [lane for lane in surplus if lane not in busy]
                draining = set(surplus) - set(release)
                if release:
                    await conn.execute(
                        update(_lane)
                        .where(_lane.c.lane.in_(release), _lane.c.owner == relay_id)
                        .values(owner=None, lease_until=None)
                    )
                    for lane in release:
                        del mine[lane]
            elif len(mine) < fair:
                free = self.dialect.for_update(
                    select(_lane.c.lane)
                    .where(or_(_lane.c.lease_until.is_(None), _lane.c.lease_until <= now))
                    .order_by(_lane.c.lane)
                    .limit(fair - len(mine)),
                    skip_locked=True,
                )
                taken = await conn.execute(
                    update(_lane)
                    .where(
                        _lane.c.lane.in_(free),
                        or_(_lane.c.lease_until.is_(None), _lane.c.lease_until <= now),
                    )
                    .values(owner=relay_id, token=_lane.c.token + 1, lease_until=until)
                    .returning(_lane.c.lane, _lane.c.token)
                )
                mine.update({int(lane): int(token) for lane, token in taken.all()})
            if random.random() < 0.01:  # forget relays gone for good, now and then
                await conn.execute(
                    delete(relay_table).where(relay_table.c.alive_until < now - timedelta(hours=1))
                )
        return Leases(mine, frozenset(draining))

    async def release(self, relay_id: str) -> None:
        """Give up every lane and the heartbeat (a relay that stops cleanly)."""
        async with self.transaction() as conn:
            await conn.execute(
                update(_lane).where(_lane.c.owner == relay_id).values(owner=None, lease_until=None)
            )
            await conn.execute(delete(relay_table).where(relay_table.c.relay_id == relay_id))

    def _fenced(self, relay_id: str, tokens: Mapping[int, int], *, now: datetime | None) -> Any:
        """The lanes of ``tokens`` still this relay's under the same token (locked shared
        on PostgreSQL, so nobody takes them until the transaction ends)."""
        stmt = select(_lane.c.lane, _lane.c.token).where(
            self.dialect.in_(_lane.c.lane, sorted(tokens)), _lane.c.owner == relay_id
        )
        if now is not None:
            stmt = stmt.where(_lane.c.lease_until > now)
        if self.locking:
            stmt = stmt.with_for_update(read=True)
        return stmt

    async def _valid(
        self, conn: AsyncConnection, relay_id: str, tokens: Mapping[int, int], now: datetime | None
    ) -> set[int]:
        if not tokens:
            return set()
        result = await conn.execute(self._fenced(relay_id, tokens, now=now))
        return {int(lane) for lane, token in result.all() if tokens.get(int(lane)) == int(token)}

    # -- claims ----------------------------------------------------------------------------

    def _candidates(self, lanes: list[int], *, ready: bool) -> Any:
        earlier = _o.alias("e")
        blocker = (
            select(earlier.c.position)
            .where(
                earlier.c.aggregate_type == _o.c.aggregate_type,
                earlier.c.aggregate_id == _o.c.aggregate_id,
                earlier.c.position < _o.c.position,
                earlier.c.published_at.is_(None),
            )
            .order_by(earlier.c.position.desc())
            .limit(1)
            .scalar_subquery()
            .label("blocker")
        )
        stmt = select(*_CLAIMED, _o.c.next_attempt_at, blocker).where(
            _PENDING, self.dialect.in_(_o.c.lane, lanes)
        )
        if ready:
            return stmt.where(_o.c.next_attempt_at.is_(None)).order_by(_o.c.position)
        now = bindparam("now", type_=_o.c.next_attempt_at.type)
        return stmt.where(_o.c.next_attempt_at.is_not(None), _o.c.next_attempt_at <= now).order_by(
            _o.c.next_attempt_at, _o.c.position
        )

    async def claim(
        self,
        relay_id: str,
        tokens: Mapping[int, int],
        *,
        batch_size: int,
        now: datetime,
        lease_seconds: float,
        exclude: set[int] | frozenset[int] = frozenset(),
    ) -> Claim:
        """Lease up to ``batch_size`` rows of this relay's lanes, each aggregate's from its head.

        Args:
            relay_id: this relay.
            tokens: the lanes it holds, with their fencing tokens.
            batch_size: rows to take at most.
            now: the time.
            lease_seconds: the claimed rows' in-flight deadline from ``now``.
            exclude: lanes not to claim in (being handed over).
        """
        lanes = sorted(set(tokens) - set(exclude))
        if not lanes:
            return Claim([], {})
        until = now + timedelta(seconds=lease_seconds)
        async with self.transaction() as conn:
            valid = await self._valid(conn, relay_id, {k: tokens[k] for k in lanes}, now)
            if not valid:
                return Claim([], {})
            lanes = sorted(valid)
            rows: dict[int, dict[str, Any]] = {}
            for ready in (True, False):
                result = await conn.execute(
                    self._candidates(lanes, ready=ready).limit(batch_size), {"now": now}
                )
                for found in result.mappings():
                    rows[found["position"]] = dict(found)
            runs, blocked = _runs(sorted(rows.values(), key=lambda r: r["position"]))
            states = await self._blockers(conn, blocked)
            taken: list[list[dict[str, Any]]] = []
            deferrals: dict[datetime, list[int]] = {}
            count = 0
            for run in runs:
                first = run[0]
                state = states.get(first["blocker"]) if first["blocker"] is not None else None
                if state is None and first["blocker"] is not None:
                    continue  # its blocker is gone since: read again next time
                if state is not None and not (
                    state["dead_at"] is not None and state["next_attempt_at"] != PARKED
                ):
                    if state["dead_at"] is not None:
                        deferrals.setdefault(PARKED, []).extend(r["position"] for r in run)
                    elif state["next_attempt_at"] is not None and state["next_attempt_at"] > now:
                        deferrals.setdefault(state["next_attempt_at"], []).extend(
                            r["position"] for r in run
                        )
                    continue
                if count >= batch_size:
                    continue
                run = run[: batch_size - count]
                count += len(run)
                taken.append(run)
            await self._number(conn, taken)
            for run in taken:
                for row in run:
                    row["next_attempt_at"] = until
            await self._lease_rows(conn, taken, until)
            for until_at, positions in deferrals.items():
                await conn.execute(
                    update(_o)
                    .where(self.dialect.in_(_o.c.position, positions), _PENDING)
                    .values(next_attempt_at=until_at)
                )
        return Claim(taken, {lane: tokens[lane] for lane in valid})

    async def _lease_rows(
        self, conn: AsyncConnection, runs: list[list[dict[str, Any]]], until: datetime
    ) -> None:
        """Defer claimed rows to their in-flight deadline and store their sequence numbers,
        in one statement of one shape whatever the batch (compiled and prepared once)."""
        rows = [row for run in runs for row in run]
        if not rows:
            return
        if self.dialect.name == "postgresql":
            table = _o.fullname
            await conn.exec_driver_sql(
                f"UPDATE {table} AS o SET next_attempt_at = $1, aggregate_seq = v.seq"
                " FROM unnest($2::bigint[], $3::bigint[]) AS v(p, seq) WHERE o.position = v.p",
                (until, [r["position"] for r in rows], [r["aggregate_seq"] for r in rows]),
            )
            return
        await conn.execute(
            update(_o)
            .where(_o.c.position == bindparam("p"))
            .values(next_attempt_at=until, aggregate_seq=bindparam("seq")),
            [{"p": r["position"], "seq": r["aggregate_seq"]} for r in rows],
        )

    async def _blockers(
        self, conn: AsyncConnection, positions: set[int]
    ) -> dict[int, Mapping[str, Any]]:
        if not positions:
            return {}
        result = await conn.execute(
            select(_o.c.position, _o.c.next_attempt_at, _o.c.dead_at, _o.c.event_name).where(
                self.dialect.in_(_o.c.position, sorted(positions)), _o.c.published_at.is_(None)
            )
        )
        return {int(row["position"]): dict(row) for row in result.mappings()}

    async def _number(self, conn: AsyncConnection, runs: list[list[dict[str, Any]]]) -> None:
        """Give rows their per-aggregate sequence number (kept across retries)."""
        wanted: dict[AggregateKey, list[dict[str, Any]]] = {}
        for run in runs:
            for row in run:
                key = _aggregate(row)
                if key is not None and row["aggregate_seq"] is None:
                    wanted.setdefault(key, []).append(row)
        if not wanted:
            return
        s = sequence_table
        insert = self.dialect.insert(s).values(
            [
                {"aggregate_type": t or "", "aggregate_id": i, "last_seq": len(rows)}
                for (t, i), rows in wanted.items()
            ]
        )
        stmt = insert.on_conflict_do_update(
            index_elements=[s.c.aggregate_type, s.c.aggregate_id],
            set_={"last_seq": s.c.last_seq + insert.excluded.last_seq},
        ).returning(s.c.aggregate_type, s.c.aggregate_id, s.c.last_seq)
        last = {(t, i): int(n) for t, i, n in (await conn.execute(stmt)).all()}
        for (t, i), rows in wanted.items():
            top = last[(t or "", i)]
            for offset, row in enumerate(rows):
                row["aggregate_seq"] = top - len(rows) + 1 + offset

    # -- marks -----------------------------------------------------------------------------

    async def record(
        self, relay_id: str, tokens: Mapping[int, int], marks: Marks, *, now: datetime
    ) -> set[int]:
        """Write what the relay did with claimed rows, in lanes still its own.

        Returns:
            The lanes the marks were refused in (lost to another relay: its claims publish
            those rows again).
        """
        lanes = marks.lanes()
        async with self.transaction() as conn:
            valid = await self._valid(
                conn, relay_id, {k: v for k, v in tokens.items() if k in lanes}, None
            )
            published = [p for lane, p in marks.published if lane in valid]
            if published:
                await conn.execute(
                    update(_o)
                    .where(self.dialect.in_(_o.c.position, published), _o.c.published_at.is_(None))
                    .values(published_at=now)
                )
            released = [p for lane, p in marks.released if lane in valid]
            if released:
                await conn.execute(
                    update(_o)
                    .where(self.dialect.in_(_o.c.position, released), _PENDING)
                    .values(next_attempt_at=None)
                )
            finished = [(key, last) for lane, key, last in marks.finished if lane in valid]
            for failure in marks.failed:
                if failure.row["lane"] not in valid:
                    continue
                await self._fail(conn, failure, now=now)
                if failure.dead and not failure.parks:
                    key = _aggregate(failure.row)
                    if key is not None:
                        finished.append((key, failure.row["position"]))
            if finished:
                # Every claimed row of these aggregates went out (or died without parking),
                # so whatever of theirs is still deferred waited behind those rows: ready.
                # (An aggregate is in one run of one relay at a time.)
                await conn.execute(
                    update(_o)
                    .where(
                        tuple_(_o.c.aggregate_type, _o.c.aggregate_id).in_(
                            sorted({key for key, _ in finished}, key=str)
                        ),
                        _PENDING,
                        _o.c.next_attempt_at.is_not(None),
                        _o.c.next_attempt_at < PARKED,
                    )
                    .values(next_attempt_at=None)
                )
        return lanes - valid

    async def _fail(self, conn: AsyncConnection, failure: Failure, *, now: datetime) -> None:
        row = failure.row
        await conn.execute(
            update(_o)
            .where(_o.c.position == row["position"], _PENDING)
            .values(
                attempts=failure.attempts,
                last_error=failure.error,
                # A dead row's own next_attempt_at says whether it parks its aggregate, so
                # every relay reads the decision the same way.
                next_attempt_at=(PARKED if failure.parks else None)
                if failure.dead
                else failure.retry_at,
                dead_at=now if failure.dead else None,
            )
        )
        key = _aggregate(row)
        if failure.dead and failure.parks and key is not None:
            # Everything after a dead head waits for the operator, in order.
            await conn.execute(
                update(_o)
                .where(
                    _o.c.aggregate_type == key[0],
                    _o.c.aggregate_id == key[1],
                    _o.c.position > row["position"],
                    _PENDING,
                )
                .values(next_attempt_at=PARKED)
            )
        elif not failure.dead and failure.behind:
            await conn.execute(
                update(_o)
                .where(self.dialect.in_(_o.c.position, list(failure.behind)), _PENDING)
                .values(next_attempt_at=failure.retry_at)
            )

    # -- the operator's view ---------------------------------------------------------------

    async def status(self, *, now: datetime) -> OutboxStatus:
        """Counts for ``qx outbox status``."""
        pending = _PENDING
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
                ("parked", and_(_PENDING, _o.c.next_attempt_at >= PARKED)),
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
                        _PENDING,
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


def _runs(rows: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]], set[int]]:
    """Split candidate rows (in position order) into runs: per aggregate, rows each of whose
    nearest earlier unpublished row is the row before it. Only an aggregate's first run can
    start at its head; the others wait behind rows this claim did not read.

    Returns:
        The first run of every aggregate (rows without aggregate: one run each), in order of
        their first position, and the blockers of those whose first row is not a head.
    """
    by_key: dict[AggregateKey | int, list[list[dict[str, Any]]]] = {}
    for row in rows:
        key = _aggregate(row)
        if key is None:
            by_key[row["position"]] = [[row]]
            continue
        runs = by_key.setdefault(key, [])
        if runs and row["blocker"] == runs[-1][-1]["position"]:
            runs[-1].append(row)
        else:
            runs.append([row])
    result: list[list[dict[str, Any]]] = []
    blocked: set[int] = set()
    for runs in by_key.values():
        result.extend(runs)
        blocked.update(run[0]["blocker"] for run in runs if run[0]["blocker"] is not None)
    result.sort(key=lambda run: run[0]["position"])
    return result, blocked
