"""Lane leases (one rule for the relays' lanes and a consumer group's partitions), on SQLite
and PostgreSQL: every member takes its fair share and no more, a stopped member's lanes are
taken by the others at their next lease, a dead one's once its lease ran out, and a lane
with work in flight is handed over only after it drained."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import utcnow
from qx.db._dialect import dialect_named
from qx.outbox import OutboxStore
from qx.outbox._leases import LeaseBook, Leases
from qx.outbox._table import inbox_lane_table, inbox_member_table


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Members:
    def __init__(self, engine: AsyncEngine, group: str, lanes: int) -> None:
        self.engine = engine
        self.book = LeaseBook(
            inbox_lane_table, inbox_member_table, "member_id", lanes, {"consumer": group}
        )
        self.dialect = dialect_named(engine.dialect.name)
        self.now = utcnow()

    async def lease(self, member: str, *, busy: set[int] | None = None) -> Leases:
        async with self.engine.begin() as conn:
            return await self.book.lease(
                conn, self.dialect, member, busy=busy or set(), now=self.now, lease_seconds=10
            )

    async def release(self, member: str) -> None:
        async with self.engine.begin() as conn:
            await self.book.release(conn, member)


async def test_members_take_their_share_and_no_more(engine: AsyncEngine) -> None:
    group = Members(engine, "billing", 6)
    assert sorted((await group.lease("a")).tokens) == [0, 1, 2, 3, 4, 5]  # alone: all
    await group.lease("b")
    await group.lease("c")  # both heartbeat: shares are now 2 each
    assert sorted((await group.lease("a")).tokens) == [0, 1]  # gives back its surplus
    # Each takes exactly its share of the four free lanes (PostgreSQL once gave the first
    # every free lane: its LIMIT inside the UPDATE bounded nothing).
    assert len((await group.lease("b")).tokens) == 2
    assert len((await group.lease("c")).tokens) == 2
    await group.release("a")  # stops cleanly: its lanes are free at once
    b, c = await group.lease("b"), await group.lease("c")
    assert len(b.tokens) == len(c.tokens) == 3 and not set(b.tokens) & set(c.tokens)
    # Another group's lanes are its own.
    other = Members(engine, "shipping", 6)
    assert len((await other.lease("x")).tokens) == 6


async def test_a_dead_members_lanes_wait_out_its_lease(engine: AsyncEngine) -> None:
    group = Members(engine, "billing", 4)
    await group.lease("a")
    await group.lease("b")
    a = await group.lease("a")
    assert len(a.tokens) == 2 and len((await group.lease("b")).tokens) == 2
    # "a" dies: nothing released. Before its lease ends "b" cannot take its lanes...
    group.now += timedelta(seconds=5)
    assert len((await group.lease("b")).tokens) == 2
    # ...after it, "b" (alone alive) takes them, each with a new fencing token.
    group.now += timedelta(seconds=6)
    taken = await group.lease("b")
    assert sorted(taken.tokens) == [0, 1, 2, 3]
    assert all(taken.tokens[lane] == a.tokens[lane] + 1 for lane in a.tokens)


async def test_a_busy_lane_drains_before_it_is_handed_over(engine: AsyncEngine) -> None:
    group = Members(engine, "billing", 4)
    assert len((await group.lease("a")).tokens) == 4
    await group.lease("b")
    busy = await group.lease("a", busy={2, 3})
    assert busy.draining == {2, 3} and set(busy.tokens) == {0, 1, 2, 3}
    assert (await group.lease("b")).tokens == {}  # nothing free yet
    assert set((await group.lease("a", busy=set())).tokens) == {0, 1}
    assert set((await group.lease("b")).tokens) == {2, 3}


async def test_relays_lease_by_the_same_rule(engine: AsyncEngine) -> None:
    store = OutboxStore(engine)
    now = utcnow()
    assert len((await store.lease("r1", busy=set(), now=now, lease_seconds=10)).tokens) == 64
    await store.lease("r2", busy=set(), now=now, lease_seconds=10)
    await store.lease("r3", busy=set(), now=now, lease_seconds=10)
    assert len((await store.lease("r1", busy=set(), now=now, lease_seconds=10)).tokens) == 22
    # The first to lease after the surplus is free takes its share, not all 42 free lanes.
    assert len((await store.lease("r2", busy=set(), now=now, lease_seconds=10)).tokens) == 21
    assert len((await store.lease("r3", busy=set(), now=now, lease_seconds=10)).tokens) == 21
