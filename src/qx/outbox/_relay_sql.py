"""``RelaySql``: the relay's hot statements for one backend, behind one strategy object.

Each backend builds its statements once, each of one shape for any batch, with readable
parameter names, and runs them through its own kind of transaction. What differs between
backends lives in their subclass and nowhere else: how a list travels (a PostgreSQL array
unnested into rows, an expanding ``IN`` on SQLite), whether a claim is one statement over
all lanes or one per lane, whether the relay's transaction runs on the driver.
:class:`OutboxStore <qx.outbox._store.OutboxStore>` speaks only in typed values to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    String,
    and_,
    bindparam,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from qx.outbox._claimed import AggregateKey, ClaimedRow, Run, claimed_columns
from qx.outbox._table import PARKED, lane_table, outbox_table
from qx.outbox._tx import Tx

__all__ = ["PENDING", "RelaySql", "RowState", "SequenceKey"]

_o = outbox_table
_lane = lane_table
#: Rows not yet published and not dead.
PENDING = and_(_o.c.published_at.is_(None), _o.c.dead_at.is_(None))

#: An aggregate's key in ``qx_outbox_sequence``.
SequenceKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class RowState:
    """What holds back the rows behind an unpublished row: its retry time, its death."""

    next_attempt_at: datetime | None
    dead_at: datetime | None


class RelaySql(ABC):
    """One backend's relay statements (see the module docstring).

    Args:
        dialect: the engine's SQLAlchemy dialect (to compile for the driver).
    """

    backend: ClassVar[str]  # the SQLAlchemy backend name these statements are for

    #: Whether relays can be woken by ``LISTEN`` (else they poll).
    listens: bool = False

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        o = _o
        until = bindparam("until", type_=o.c.next_attempt_at.type)
        self._fenced = self._lock_shared(
            select(_lane.c.lane, _lane.c.token).where(
                self._within(_lane.c.lane, "lanes", Integer()),
                _lane.c.owner == bindparam("relay"),
            )
        )
        self._fenced_live = self._fenced.where(
            _lane.c.lease_until > bindparam("now", type_=_lane.c.lease_until.type)
        )
        self._blockers = select(o.c.position, o.c.next_attempt_at, o.c.dead_at).where(
            self._within(o.c.position, "positions", BigInteger()), o.c.published_at.is_(None)
        )
        self._defer = (
            update(o)
            .where(self._within(o.c.position, "positions", BigInteger()), PENDING)
            .values(next_attempt_at=until)
        )
        self._fail = (
            update(o)
            .where(o.c.position == bindparam("position_"), PENDING)
            .values(
                attempts=bindparam("tries"),
                last_error=bindparam("error"),
                next_attempt_at=bindparam("retry_at", type_=o.c.next_attempt_at.type),
                dead_at=bindparam("died_at", type_=o.c.dead_at.type),
                aggregate_seq=bindparam("number"),
            )
        )
        self._park = (
            update(o)
            .where(
                # A row may have an aggregate id without a type.
                o.c.aggregate_type.is_not_distinct_from(bindparam("of_type", type_=String())),
                o.c.aggregate_id == bindparam("of_id"),
                o.c.position > bindparam("after"),
                PENDING,
            )
            .values(next_attempt_at=PARKED)
        )

    # -- what each backend says its own way ----------------------------------------------

    @abstractmethod
    def _within(self, column: Any, name: str, kind: Any) -> ColumnElement[bool]:
        """``column`` is one of the list parameter ``name`` (of ``kind``)."""

    @abstractmethod
    def _lock_shared(self, stmt: Any) -> Any:
        """``stmt`` locking the rows it reads against updates (where the backend can)."""

    @abstractmethod
    def transaction(self, conn: AsyncConnection, driver: Any) -> AbstractAsyncContextManager[Tx]:
        """One relay transaction on a pooled connection (``driver``: its driver connection)."""

    @abstractmethod
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
        """Up to ``batch`` ready rows (or, ``due``, deferred rows due at ``now``), lane by
        lane in the order given, each with its blocker; positions in ``skip`` passed over."""

    @abstractmethod
    async def followers(self, tx: Tx, runs: Sequence[Run], *, per: int) -> dict[int, Run]:
        """Per run (keyed by its first position), up to ``per`` unpublished rows of its
        aggregate after its last, in order."""

    @abstractmethod
    async def last_numbers(self, tx: Tx, keys: Sequence[SequenceKey]) -> dict[SequenceKey, int]:
        """The last number each of these aggregates published (absent: none yet)."""

    @abstractmethod
    async def advance(self, tx: Tx, top: Mapping[SequenceKey, int]) -> None:
        """Raise aggregates' last published numbers (never lowers one)."""

    @abstractmethod
    async def mark_published(
        self, tx: Tx, numbered: Sequence[tuple[int, int | None]], *, now: datetime
    ) -> None:
        """Mark ``(position, number)`` rows published at ``now`` with their numbers."""

    @abstractmethod
    async def unblock(self, tx: Tx, keys: Sequence[SequenceKey]) -> None:
        """Make ready the deferred (not parked) rows of these aggregates."""

    # -- the same everywhere ------------------------------------------------------------

    def candidate_columns(self) -> tuple[Any, ...]:
        """A claim's select list: the claimed row's columns and its blocker."""
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
        return (*claimed_columns(_o), blocker)

    def candidate_filters(self, *, due: bool, passed_over: Any) -> tuple[Any, ...]:
        """Pending rows not in flight here, ready or (``due``) deferred and due now."""
        if not due:
            return (PENDING, passed_over, _o.c.next_attempt_at.is_(None))
        now = bindparam("now", type_=_o.c.next_attempt_at.type)
        due_now = (_o.c.next_attempt_at.is_not(None), _o.c.next_attempt_at <= now)
        return (PENDING, passed_over, *due_now)

    async def fenced(
        self, tx: Tx, *, lanes: Sequence[int], relay: str, live_at: datetime | None
    ) -> dict[int, int]:
        """``lane → token`` of those of ``lanes`` ``relay`` owns (with ``live_at``: whose
        lease has not run out), locked shared where the backend can."""
        params: dict[str, Any] = {"lanes": list(lanes), "relay": relay}
        stmt = self._fenced
        if live_at is not None:
            params["now"], stmt = live_at, self._fenced_live
        return {int(lane): int(token) for lane, token in await tx.rows(stmt, params)}

    async def row_states(self, tx: Tx, positions: Sequence[int]) -> dict[int, RowState]:
        """The state of those of ``positions`` still unpublished."""
        found = await tx.rows(self._blockers, {"positions": list(positions)})
        return {int(p): RowState(at, dead) for p, at, dead in found}

    async def defer(self, tx: Tx, positions: Sequence[int], *, until: datetime) -> None:
        """Make pending ``positions`` due at ``until``."""
        await tx.run(self._defer, {"positions": list(positions), "until": until})

    async def fail(
        self,
        tx: Tx,
        *,
        position: int,
        attempts: int,
        error: str,
        retry_at: datetime | None,
        dead_at: datetime | None,
        number: int | None,
    ) -> None:
        """Record a failed publish of the row at ``position``."""
        params = {
            "position_": position,
            "tries": attempts,
            "error": error,
            "retry_at": retry_at,
            "died_at": dead_at,
            "number": number,
        }
        await tx.run(self._fail, params)

    async def park(self, tx: Tx, key: AggregateKey, *, after: int) -> None:
        """Park the pending rows of aggregate ``key`` after ``after``."""
        await tx.run(self._park, {"of_type": key[0], "of_id": key[1], "after": after})
