"""The relay's hot statements, each built once per backend and of one shape for any batch,
and the transaction that runs them.

Lists travel as one parameter (a PostgreSQL array; an expanding parameter on SQLite), so a
statement compiles once. On PostgreSQL the relay's transaction runs them on the asyncpg
connection itself, compiled once per store: the hot path skips SQLAlchemy's per-statement
work. Elsewhere (SQLite) the same statements go through SQLAlchemy Core.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    String,
    Text,
    all_,
    and_,
    any_,
    bindparam,
    cast,
    func,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from qx.outbox._table import PARKED, lane_table, outbox_table, sequence_table

__all__ = [
    "PENDING",
    "Compiled",
    "CoreTx",
    "DriverTx",
    "Statements",
    "Tx",
    "claimed_columns",
    "statements",
    "terminate",
]

_o = outbox_table
_lane = lane_table
#: Rows not yet published and not dead.
PENDING = and_(_o.c.published_at.is_(None), _o.c.dead_at.is_(None))


def claimed_columns(t: Any) -> tuple[Any, ...]:
    """What a relay needs of a row of ``t`` (the outbox or an alias of it); payload and
    headers as JSON text, which envelopes embed as is."""
    return (
        t.c.position,
        t.c.id,
        t.c.event_name,
        t.c.event_version,
        t.c.aggregate_type,
        t.c.aggregate_id,
        cast(t.c.payload, Text).label("payload"),
        cast(t.c.headers, Text).label("headers"),
        t.c.occurred_at,
        t.c.correlation_id,
        t.c.causation_id,
        t.c.tenant_id,
        t.c.attempts,
        t.c.lane,
        t.c.aggregate_seq,
        t.c.next_attempt_at,
        t.c.dead_at,
    )


@dataclass(frozen=True, slots=True)
class Statements:
    """One backend's statements (parameters named in each docstring line)."""

    fenced: Any  # lanes, me: this relay's lanes and tokens, locked shared
    fenced_live: Any  # lanes, me, now: the same, unexpired
    ready: Any  # PostgreSQL lanes / SQLite lane, skip, batch: ready rows, with blockers
    due: Any  # PostgreSQL lanes / SQLite lane, skip, now, batch: deferred rows due now
    blockers: Any  # positions: state of the given unpublished rows
    followers: Any  # PostgreSQL: ht, hi, hp, hf, per; SQLite: t, i, after, per
    sequences: Any  # PostgreSQL: kt, ki; SQLite: keys: the last numbers given
    advance: Any  # PostgreSQL: st, si, sn; SQLite (many): t, i, n: raise the last numbers
    defer: Any  # positions, until
    published: Any  # PostgreSQL: now, ps, ss; SQLite (many): now, p, seq
    fail: Any  # p, attempts, error, next, dead, seq
    park: Any  # t, i, after
    unblock: Any  # PostgreSQL: ts, is; SQLite: keys


@cache
def statements(dialect: str) -> Statements:
    """The statements of ``dialect`` (``postgresql`` or ``sqlite``), built once."""
    pg = dialect == "postgresql"

    def within(column: ColumnElement[Any], name: str, kind: Any) -> ColumnElement[bool]:
        if pg:
            return column == any_(bindparam(name, type_=postgresql.ARRAY(kind)))
        return column.in_(bindparam(name, expanding=True))

    def fenced(live: bool) -> Any:
        stmt = select(_lane.c.lane, _lane.c.token).where(
            within(_lane.c.lane, "lanes", Integer()), _lane.c.owner == bindparam("me")
        )
        if live:
            stmt = stmt.where(
                _lane.c.lease_until > bindparam("now", type_=_lane.c.lease_until.type)
            )
        return stmt.with_for_update(read=True) if pg else stmt

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
    now = bindparam("now", type_=_o.c.next_attempt_at.type)
    batch = bindparam("batch", type_=Integer())
    # Rows in flight at this relay are left out here, not marked in the table: the lane
    # is the relay's alone, so no other relay could take them anyway.
    in_flight = (
        _o.c.position != all_(bindparam("skip", type_=postgresql.ARRAY(BigInteger())))
        if pg
        else _o.c.position.not_in(bindparam("skip", expanding=True))
    )
    # Lane by lane, each through its own range of the state's index ((lane, position) for
    # ready rows, (lane, next_attempt_at) for deferred ones): a claim reads what it takes,
    # whatever the other relays' lanes hold. Within a lane rows come in order, which is all
    # the per-aggregate order needs (an aggregate lives in one lane).
    ready_where = (PENDING, in_flight, _o.c.next_attempt_at.is_(None))
    due_where = (
        PENDING,
        in_flight,
        _o.c.next_attempt_at.is_not(None),
        _o.c.next_attempt_at <= now,
    )
    columns = (*claimed_columns(_o), blocker)
    if pg:
        # The lanes in the order given (the relay rotates it); the outer LIMIT stops the
        # nested loop as soon as the batch is full.
        lanes = (
            func.unnest(bindparam("lanes", type_=postgresql.ARRAY(Integer())))
            .table_valued("lane")
            .render_derived(name="l")
        )

        def by_lane(where: tuple[Any, ...], order: tuple[Any, ...]) -> Any:
            per_lane = (
                select(*columns)
                .where(_o.c.lane == lanes.c.lane, *where)
                .order_by(*order)
                .limit(batch)
                .lateral("x")
            )
            return select(per_lane).select_from(lanes.join(per_lane, true())).limit(batch)

        ready: Any = by_lane(ready_where, (_o.c.position,))
        due: Any = by_lane(due_where, (_o.c.next_attempt_at, _o.c.position))
    else:
        # SQLite runs one statement per lane (in process, a probe is cheap).
        lane = bindparam("lane", type_=Integer())
        ready = select(*columns).where(_o.c.lane == lane, *ready_where)
        ready = ready.order_by(_o.c.position).limit(batch)
        due = select(*columns).where(_o.c.lane == lane, *due_where)
        due = due.order_by(_o.c.next_attempt_at, _o.c.position).limit(batch)
    blockers = select(_o.c.position, _o.c.next_attempt_at, _o.c.dead_at).where(
        within(_o.c.position, "positions", BigInteger()), _o.c.published_at.is_(None)
    )
    f = _o.alias("f")
    per = bindparam("per", type_=Integer())
    if pg:
        heads = (
            postgresql_unnest(
                ("ht", String()), ("hi", String()), ("hp", BigInteger()), ("hf", BigInteger())
            )
            .table_valued("t", "i", "p", "first")
            .render_derived(name="h")
        )
        lateral = (
            select(*claimed_columns(f))
            .where(
                f.c.aggregate_type == heads.c.t,
                f.c.aggregate_id == heads.c.i,
                f.c.position > heads.c.p,
                f.c.published_at.is_(None),
            )
            .order_by(f.c.position)
            .limit(per)
            .lateral("x")
        )
        followers: Any = select(heads.c.first, lateral).select_from(heads.join(lateral, true()))
        s = sequence_table
        source = (
            postgresql_unnest(("st", String()), ("si", String()), ("sn", BigInteger()))
            .table_valued("t", "i", "n")
            .render_derived(name="v")
        )
        insert = postgresql.insert(s).from_select(
            ["aggregate_type", "aggregate_id", "last_seq"],
            select(source.c.t, source.c.i, source.c.n),
        )
        advance: Any = insert.on_conflict_do_update(
            index_elements=[s.c.aggregate_type, s.c.aggregate_id],
            set_={"last_seq": func.greatest(s.c.last_seq, insert.excluded.last_seq)},
        )
        marked = (
            postgresql_unnest(("ps", BigInteger()), ("ss", BigInteger()))
            .table_valued("p", "seq")
            .render_derived(name="v")
        )
        published: Any = (
            update(_o)
            .where(_o.c.position == marked.c.p, _o.c.published_at.is_(None))
            .values(
                published_at=bindparam("now", type_=_o.c.published_at.type),
                aggregate_seq=marked.c.seq,
            )
        )
        keys = (
            postgresql_unnest(("kt", String()), ("ki", String()))
            .table_valued("t", "i")
            .render_derived(name="k")
        )
        aggregates: Any = tuple_(_o.c.aggregate_type, _o.c.aggregate_id).in_(
            select(keys.c.t, keys.c.i)
        )
    else:
        followers = (
            select(*claimed_columns(f))
            .where(
                f.c.aggregate_type == bindparam("t"),
                f.c.aggregate_id == bindparam("i"),
                f.c.position > bindparam("after"),
                f.c.published_at.is_(None),
            )
            .order_by(f.c.position)
            .limit(per)
        )
        s = sequence_table
        upsert = sqlite.insert(s).values(
            aggregate_type=bindparam("t"), aggregate_id=bindparam("i"), last_seq=bindparam("n")
        )
        advance = upsert.on_conflict_do_update(
            index_elements=[s.c.aggregate_type, s.c.aggregate_id],
            set_={"last_seq": func.max(s.c.last_seq, upsert.excluded.last_seq)},
        )
        published = (
            update(_o)
            .where(_o.c.position == bindparam("p"), _o.c.published_at.is_(None))
            .values(
                published_at=bindparam("now", type_=_o.c.published_at.type),
                aggregate_seq=bindparam("seq"),
            )
        )
        aggregates = tuple_(_o.c.aggregate_type, _o.c.aggregate_id).in_(
            bindparam("keys", expanding=True)
        )
    seq = sequence_table
    if pg:
        known = postgresql_unnest(("kt", String()), ("ki", String())).table_valued("t", "i")
        known = known.render_derived(name="k")
        in_keys: Any = tuple_(seq.c.aggregate_type, seq.c.aggregate_id).in_(
            select(known.c.t, known.c.i)
        )
    else:
        in_keys = tuple_(seq.c.aggregate_type, seq.c.aggregate_id).in_(
            bindparam("keys", expanding=True)
        )
    sequences = select(seq.c.aggregate_type, seq.c.aggregate_id, seq.c.last_seq).where(in_keys)
    positions = within(_o.c.position, "positions", BigInteger())
    return Statements(
        fenced=fenced(live=False),
        fenced_live=fenced(live=True),
        ready=ready,
        due=due,
        blockers=blockers,
        followers=followers,
        sequences=sequences,
        advance=advance,
        defer=update(_o)
        .where(positions, PENDING)
        .values(next_attempt_at=bindparam("until", type_=_o.c.next_attempt_at.type)),
        published=published,
        fail=update(_o)
        .where(_o.c.position == bindparam("p"), PENDING)
        .values(
            attempts=bindparam("attempts"),
            last_error=bindparam("error"),
            next_attempt_at=bindparam("next", type_=_o.c.next_attempt_at.type),
            dead_at=bindparam("dead", type_=_o.c.dead_at.type),
            aggregate_seq=bindparam("seq"),
        ),
        park=update(_o)
        .where(
            _o.c.aggregate_type == bindparam("t"),
            _o.c.aggregate_id == bindparam("i"),
            _o.c.position > bindparam("after"),
            PENDING,
        )
        .values(next_attempt_at=PARKED),
        unblock=update(_o)
        .where(
            aggregates,
            PENDING,
            _o.c.next_attempt_at.is_not(None),
            _o.c.next_attempt_at < PARKED,
        )
        .values(next_attempt_at=None),
    )


def postgresql_unnest(*arrays: tuple[str, Any]) -> Any:
    """``unnest(:a::T[], :b::U[], ...)``: parallel arrays as rows."""
    return func.unnest(*(bindparam(name, type_=postgresql.ARRAY(kind)) for name, kind in arrays))


class Tx(Protocol):
    """One relay transaction running :class:`Statements`."""

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Rows of a query, as dicts."""

    async def run(self, stmt: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Run a statement (once per mapping when given several)."""


class CoreTx:
    """Statements through SQLAlchemy Core on an ``AsyncConnection``."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        result = await self.conn.execute(stmt, dict(params))
        return [dict(row) for row in result.mappings()]

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
    store's cache, keyed by statement)."""

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

    async def rows(self, stmt: Any, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        sql, args = self._args(stmt, params)
        return [dict(r) for r in await self.driver.fetch(sql, *args)]

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
