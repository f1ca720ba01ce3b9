"""The relay's statements on SQLite: lists travel as expanding ``IN`` parameters, a claim
runs one statement per lane and a run's followers one per run (in process, a probe is
cheap), many rows are written by ``executemany``, and the transaction goes through
SQLAlchemy Core."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Integer, bindparam, func, select, tuple_, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from qx.outbox._claimed import ClaimedRow, Run, claimed_columns
from qx.outbox._relay_sql import PENDING, RelaySql, SequenceKey
from qx.outbox._table import PARKED, outbox_table, sequence_table
from qx.outbox._tx import CoreTx, Tx

__all__ = ["SqliteRelaySql"]

_o = outbox_table
_seq = sequence_table


class SqliteRelaySql(RelaySql):
    """See :class:`~qx.outbox._relay_sql.RelaySql`."""

    backend: ClassVar[str] = "sqlite"

    def __init__(self, dialect: Any) -> None:
        super().__init__(dialect)
        columns = self.candidate_columns()
        lane, batch = bindparam("lane", type_=Integer()), bindparam("batch", type_=Integer())
        passed_over = _o.c.position.not_in(bindparam("skip", expanding=True))

        def in_lane(due: bool, order: tuple[Any, ...]) -> Any:
            filters = self.candidate_filters(due=due, passed_over=passed_over)
            return select(*columns).where(_o.c.lane == lane, *filters).order_by(*order).limit(batch)

        self._ready = in_lane(False, (_o.c.position,))
        self._due = in_lane(True, (_o.c.next_attempt_at, _o.c.position))
        f = _o.alias("f")
        self._followers = (
            select(*claimed_columns(f))
            .where(
                f.c.aggregate_type == bindparam("of_type"),
                f.c.aggregate_id == bindparam("of_id"),
                f.c.position > bindparam("after"),
                f.c.published_at.is_(None),
            )
            .order_by(f.c.position)
            .limit(bindparam("per", type_=Integer()))
        )
        in_keys = tuple_(_seq.c.aggregate_type, _seq.c.aggregate_id).in_(
            bindparam("keys", expanding=True)
        )
        self._last_numbers = select(
            _seq.c.aggregate_type, _seq.c.aggregate_id, _seq.c.last_seq
        ).where(in_keys)
        upsert = sqlite.insert(_seq).values(
            aggregate_type=bindparam("of_type"),
            aggregate_id=bindparam("of_id"),
            last_seq=bindparam("last_number"),
        )
        self._advance = upsert.on_conflict_do_update(
            index_elements=[_seq.c.aggregate_type, _seq.c.aggregate_id],
            set_={"last_seq": func.max(_seq.c.last_seq, upsert.excluded.last_seq)},
        )
        self._published = (
            update(_o)
            .where(_o.c.position == bindparam("position_"), _o.c.published_at.is_(None))
            .values(
                published_at=bindparam("now", type_=_o.c.published_at.type),
                aggregate_seq=bindparam("number"),
            )
        )
        self._unblock = (
            update(_o)
            .where(
                tuple_(_o.c.aggregate_type, _o.c.aggregate_id).in_(
                    bindparam("keys", expanding=True)
                ),
                PENDING,
                _o.c.next_attempt_at.is_not(None),
                _o.c.next_attempt_at < PARKED,
            )
            .values(next_attempt_at=None)
        )

    def _within(self, column: Any, name: str, kind: Any) -> ColumnElement[bool]:
        return column.in_(bindparam(name, expanding=True))  # type: ignore[no-any-return]

    def _lock_shared(self, stmt: Any) -> Any:
        return stmt  # one writer at a time: nothing to lock against

    @asynccontextmanager
    async def transaction(self, conn: AsyncConnection, driver: Any) -> AsyncIterator[Tx]:
        await conn.begin()
        yield CoreTx(conn)
        await conn.commit()

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
        found: list[ClaimedRow] = []
        stmt = self._due if due else self._ready
        for lane in lanes:
            need = batch - len(found)
            if need <= 0:
                break
            params: dict[str, Any] = {"lane": lane, "batch": need, "skip": list(skip)}
            if due:
                params["now"] = now
            found += [ClaimedRow.of(row) for row in await tx.rows(stmt, params)]
        return found

    async def followers(self, tx: Tx, runs: Sequence[Run], *, per: int) -> dict[int, Run]:
        found: dict[int, Run] = {}
        for run in runs:
            params = {
                "of_type": run[0].aggregate_type,
                "of_id": run[0].aggregate_id,
                "after": run[-1].position,
                "per": per,
            }
            rows = await tx.rows(self._followers, params)
            found[run[0].position] = [ClaimedRow.of(row) for row in rows]
        return found

    async def last_numbers(self, tx: Tx, keys: Sequence[SequenceKey]) -> dict[SequenceKey, int]:
        found = await tx.rows(self._last_numbers, {"keys": list(keys)})
        return {(t, i): int(n) for t, i, n in found}

    async def advance(self, tx: Tx, top: Mapping[SequenceKey, int]) -> None:
        rows = [{"of_type": t, "of_id": i, "last_number": n} for (t, i), n in sorted(top.items())]
        await tx.run(self._advance, rows)

    async def mark_published(
        self, tx: Tx, numbered: Sequence[tuple[int, int | None]], *, now: datetime
    ) -> None:
        rows = [{"now": now, "position_": p, "number": n} for p, n in numbered]
        await tx.run(self._published, rows)

    async def unblock(self, tx: Tx, keys: Sequence[SequenceKey]) -> None:
        await tx.run(self._unblock, {"keys": list(keys)})
