"""The relay's statements on PostgreSQL: lists travel as arrays (``unnest`` into rows, or
``= ANY``), a claim is one statement over all lanes, and the relay's transaction runs on
the asyncpg connection with each statement compiled once per store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    String,
    all_,
    and_,
    any_,
    bindparam,
    func,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from qx.outbox._claimed import ClaimedRow, Run, claimed_columns
from qx.outbox._relay_sql import PENDING, RelaySql, SequenceKey
from qx.outbox._table import PARKED, outbox_table, sequence_table
from qx.outbox._tx import Compiled, DriverTx, Tx

__all__ = ["PostgresRelaySql"]

_o = outbox_table
_seq = sequence_table


def _unnest(name: str, *arrays: tuple[str, Any]) -> Any:
    """``unnest(:a::T[], :b::U[], ...) AS name(a, b, ...)``: parallel arrays as rows whose
    columns are named after their parameters."""
    rows = func.unnest(*(bindparam(p, type_=postgresql.ARRAY(kind)) for p, kind in arrays))
    return rows.table_valued(*(p for p, _ in arrays)).render_derived(name=name)


class PostgresRelaySql(RelaySql):
    """See :class:`~qx.outbox._relay_sql.RelaySql`."""

    backend: ClassVar[str] = "postgresql"

    listens = True

    def __init__(self, dialect: Any) -> None:
        super().__init__(dialect)
        self._compiled: dict[int, Compiled] = {}
        columns = self.candidate_columns()
        batch = bindparam("batch", type_=Integer())
        # Rows in flight at this relay are left out here, not marked in the table: the lane
        # is the relay's alone, so no other relay could take them anyway.
        passed_over = _o.c.position != all_(bindparam("skip", type_=postgresql.ARRAY(BigInteger())))
        # The lanes in the order given (the relay rotates it), each through its own range of
        # the state's partial index; the outer LIMIT stops the nested loop once the batch is
        # full. Within a lane rows come in order, which is all the per-aggregate order needs.
        lanes = _unnest("l", ("lanes", Integer()))

        def by_lane(due: bool, order: tuple[Any, ...]) -> Any:
            filters = self.candidate_filters(due=due, passed_over=passed_over)
            per_lane = (
                select(*columns)
                .where(_o.c.lane == lanes.c.lanes, *filters)
                .order_by(*order)
                .limit(batch)
                .lateral("x")
            )
            return select(per_lane).select_from(lanes.join(per_lane, true())).limit(batch)

        self._ready = by_lane(False, (_o.c.position,))
        self._due = by_lane(True, (_o.c.next_attempt_at, _o.c.position))

        f = _o.alias("f")
        heads = _unnest(
            "h",
            ("head_types", String()),
            ("head_ids", String()),
            ("after_positions", BigInteger()),
            ("first_positions", BigInteger()),
        )
        following = (
            select(*claimed_columns(f))
            .where(
                f.c.aggregate_type == heads.c.head_types,
                f.c.aggregate_id == heads.c.head_ids,
                f.c.position > heads.c.after_positions,
                f.c.published_at.is_(None),
            )
            .order_by(f.c.position)
            .limit(bindparam("per", type_=Integer()))
            .lateral("x")
        )
        self._followers = select(heads.c.first_positions, following).select_from(
            heads.join(following, true())
        )

        # Aggregates travel as parallel arrays, unnested and joined to the table: one index
        # probe per aggregate given (a "(type, id) IN (SELECT unnest ...)" was planned as a
        # scan of the whole sequence table, or of every deferred row, per statement).
        keys = _unnest("k", ("aggregate_types", String()), ("aggregate_ids", String()))
        self._last_numbers = select(
            _seq.c.aggregate_type, _seq.c.aggregate_id, _seq.c.last_seq
        ).select_from(
            keys.join(
                _seq,
                and_(
                    _seq.c.aggregate_type == keys.c.aggregate_types,
                    _seq.c.aggregate_id == keys.c.aggregate_ids,
                ),
            )
        )
        source = _unnest(
            "v",
            ("aggregate_types", String()),
            ("aggregate_ids", String()),
            ("last_numbers", BigInteger()),
        )
        insert = postgresql.insert(_seq).from_select(
            ["aggregate_type", "aggregate_id", "last_seq"], select(source)
        )
        self._advance = insert.on_conflict_do_update(
            index_elements=[_seq.c.aggregate_type, _seq.c.aggregate_id],
            set_={"last_seq": func.greatest(_seq.c.last_seq, insert.excluded.last_seq)},
        )
        marked = _unnest("m", ("positions", BigInteger()), ("numbers", BigInteger()))
        self._published = (
            update(_o)
            .where(_o.c.position == marked.c.positions, _o.c.published_at.is_(None))
            .values(
                published_at=bindparam("now", type_=_o.c.published_at.type),
                aggregate_seq=marked.c.numbers,
            )
        )
        self._unblock = (
            update(_o)
            .where(
                _o.c.aggregate_type == keys.c.aggregate_types,
                _o.c.aggregate_id == keys.c.aggregate_ids,
                PENDING,
                _o.c.next_attempt_at.is_not(None),
                _o.c.next_attempt_at < PARKED,
            )
            .values(next_attempt_at=None)
        )

    def candidate_statement(self, *, due: bool) -> Any:
        """The claim's statement (parameters ``lanes``, ``skip``, ``batch``, and ``now`` when
        ``due``), for plans and tests."""
        return self._due if due else self._ready

    def _within(self, column: Any, name: str, kind: Any) -> ColumnElement[bool]:
        return column == any_(bindparam(name, type_=postgresql.ARRAY(kind)))  # type: ignore[no-any-return]

    def _lock_shared(self, stmt: Any) -> Any:
        return stmt.with_for_update(read=True)

    @asynccontextmanager
    async def transaction(self, conn: AsyncConnection, driver: Any) -> AsyncIterator[Tx]:
        # The hot path skips SQLAlchemy's per-statement work: asyncpg runs SQL compiled once.
        async with driver.transaction():
            yield DriverTx(driver, self.dialect, self._compiled)

    async def candidates(
        self,
        tx: Tx,
        *,
        due: bool,
        lanes: Sequence[int],
        skip: Sequence[int],
        now: datetime,
        batch: int,
    ) -> list[ClaimedRow]:
        params: dict[str, Any] = {"lanes": list(lanes), "skip": list(skip), "batch": batch}
        if due:
            params["now"] = now
        found = await tx.rows(self._due if due else self._ready, params)
        return [ClaimedRow.of(row) for row in found]

    async def followers(self, tx: Tx, runs: Sequence[Run], *, per: int) -> dict[int, Run]:
        params = {
            "head_types": [run[0].aggregate_type for run in runs],
            "head_ids": [run[0].aggregate_id for run in runs],
            "after_positions": [run[-1].position for run in runs],
            "first_positions": [run[0].position for run in runs],
            "per": per,
        }
        found: dict[int, Run] = {}
        for first, *row in await tx.rows(self._followers, params):
            found.setdefault(int(first), []).append(ClaimedRow.of(row))
        return found

    async def last_numbers(self, tx: Tx, keys: Sequence[SequenceKey]) -> dict[SequenceKey, int]:
        params = {"aggregate_types": [t for t, _ in keys], "aggregate_ids": [i for _, i in keys]}
        return {(t, i): int(n) for t, i, n in await tx.rows(self._last_numbers, params)}

    async def advance(self, tx: Tx, top: Mapping[SequenceKey, int]) -> None:
        keys = sorted(top)
        params = {
            "aggregate_types": [t for t, _ in keys],
            "aggregate_ids": [i for _, i in keys],
            "last_numbers": [top[k] for k in keys],
        }
        await tx.run(self._advance, params)

    async def mark_published(
        self, tx: Tx, numbered: Sequence[tuple[int, int | None]], *, now: datetime
    ) -> None:
        params = {
            "now": now,
            "positions": [p for p, _ in numbered],
            "numbers": [n for _, n in numbered],
        }
        await tx.run(self._published, params)

    async def unblock(self, tx: Tx, keys: Sequence[SequenceKey]) -> None:
        params = {"aggregate_types": [t for t, _ in keys], "aggregate_ids": [i for _, i in keys]}
        await tx.run(self._unblock, params)
