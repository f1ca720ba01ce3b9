"""The relay's lease protocol, from the operator's side: a relay cut off from PostgreSQL
costs its peers one lease period and obeys SIGTERM; a slow publish holds back only its own
aggregate; a claim leases exactly what it returns and reads only rows it can publish."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import FixedClock, utcnow
from qx.db import UnitOfWorkFactory, create_engine
from qx.errors import PublishError
from qx.outbox import Envelope, OutboxRelay, OutboxStore, RelayState, outbox_table
from qx.outbox._relay_sql_postgres import PostgresRelaySql
from qx.outbox._table import lane_table
from qx.settings import DatabaseSettings, RelaySettings
from qx.testing import MemoryPublisher
from tests import models
from tests.integration.proxy import Proxy
from tests.integration.test_relay_crash import current_schema

Factory = UnitOfWorkFactory[models.AppUnitOfWork]
o = outbox_table


@pytest.fixture
def backend() -> str:
    return "postgresql"


async def counters(factory: Factory, count: int) -> list[UUID]:
    async with factory() as uow:
        made = [models.Counter(name=f"c{i}") for i in range(count)]
        await uow.counters.add_many(made)
        await uow.commit()
    return [c.id for c in made]


async def bump(factory: Factory, ident: UUID, times: int = 1) -> None:
    for _ in range(times):
        async with factory() as uow:
            (await uow.counters.require(ident)).increment(integration=True)
            await uow.commit()


async def unpublished(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).where(o.c.published_at.is_(None))) or 0)


async def until(condition: Any, seconds: float, what: str) -> float:
    """Wait for ``condition()`` (async); return the seconds it took."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
async def proxied_postgres(engine: AsyncEngine) -> AsyncIterator[tuple[Proxy, str]]:
    url = make_url(str(engine.url))
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        yield (
            proxy,
            url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
        )
    finally:
        await proxy.stop()


@pytest.mark.timeout(120)
async def test_a_relay_cut_off_silently_costs_its_peers_one_lease_and_obeys_sigterm(
    engine: AsyncEngine, uow_factory: Factory, proxied_postgres: tuple[Proxy, str]
) -> None:
    proxy, url = proxied_postgres
    ids = await counters(uow_factory, 30)
    for ident in ids:
        await bump(uow_factory, ident, 2)
    lease = 2.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}
    env.update(
        QX_DB__URL=url,
        QX_DB__SEARCH_PATH=await current_schema(engine),
        QX_BROKER__URL="memory://",
        QX_RELAY__LEASE_SECONDS=str(lease),
        QX_RELAY__DB_TIMEOUT="2",
        QX_RELAY__SHUTDOWN_TIMEOUT="2",
        QX_RELAY__POLL_INTERVAL="0.1",
    )
    relay_a = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from qx.cli import main; main()",
        "outbox",
        "relay",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def a_holds_every_lane_and_drained() -> bool:
            async with engine.connect() as conn:
                owners = (await conn.execute(select(lane_table.c.owner).distinct())).all()
            return len(owners) == 1 and owners[0][0] is not None and not await unpublished(engine)

        await until(a_holds_every_lane_and_drained, 30, "relay A drains the backlog")
        proxy.blackhole()  # A's sockets stay open; nothing reaches either end any more
        for ident in ids:
            await bump(uow_factory, ident)
        publisher = MemoryPublisher()
        settings = RelaySettings(lease_seconds=lease, poll_interval=0.1, db_timeout=2)
        relay_b = OutboxRelay(engine, publisher, settings=settings)
        task = asyncio.create_task(relay_b.run())
        started = time.monotonic()
        try:

            async def drained() -> bool:
                return not await unpublished(engine)

            # A's lanes come free when its lease runs out; B takes them and publishes.
            took = await until(drained, 4 * lease + 5, "relay B publishes A's aggregates")
        finally:
            relay_b.stop()
            await asyncio.wait_for(task, 15)
        # A's lanes come free once its lease runs out; B's next lease turn (every second)
        # takes them and publishes at once: nothing of A's was left written as in flight.
        assert took <= lease + 3.5, (took, time.monotonic() - started)
        values = {str(i): [] for i in ids}  # type: dict[str, list[int]]
        for envelope in publisher.published:
            values[envelope.data["counter_id"]].append(envelope.data["value"])
        assert all(v == [3] for v in values.values()), values
        # SIGTERM reaches A in whatever state the dead network left it: it exits in bounded
        # time (shutdown_timeout plus two db_timeout periods, and process start-up slack).
        relay_a.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(relay_a.wait(), 15)
        assert code == 0
    finally:
        if relay_a.returncode is None:
            relay_a.kill()
            await relay_a.wait()


class SlowFor(MemoryPublisher):
    """Publishes at once, except for one aggregate: that one waits, then is refused (as a
    subject that no stream holds times out)."""

    def __init__(self, slow: str, seconds: float) -> None:
        super().__init__()
        self.slow, self.seconds = slow, seconds
        self.sent_at: dict[UUID, float] = {}

    async def publish(self, envelope: Envelope) -> None:
        if envelope.aggregate_id == self.slow:
            await asyncio.sleep(self.seconds)  # the broker's silence, not a test wait
            raise PublishError("no acknowledgement in time")
        await super().publish(envelope)
        self.sent_at[envelope.id] = time.monotonic()


@pytest.mark.timeout(60)
async def test_a_slow_publish_holds_back_only_its_own_aggregate(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    slow, *others = await counters(uow_factory, 11)
    publisher = SlowFor(str(slow), seconds=3.0)
    relay = OutboxRelay(
        engine, publisher, settings=RelaySettings(poll_interval=0.05, backoff_base=10)
    )
    task = asyncio.create_task(relay.run())
    committed: dict[str, float] = {}
    try:
        await bump(uow_factory, slow)  # its publish now hangs for 3 s
        for round_ in range(3):
            for ident in others:
                await bump(uow_factory, ident)
                committed[f"{ident}:{round_ + 1}"] = time.monotonic()

        async def all_others_out() -> bool:
            return len(publisher.sent_at) == len(committed)

        await until(all_others_out, 10, "the other aggregates' events go out")
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
    latencies = sorted(
        publisher.sent_at[e.id] - committed[f"{e.aggregate_id}:{e.data['value']}"]
        for e in publisher.published
    )
    # Well under the slow publish's 3 s, even at the worst.
    assert latencies[-1] < 1.5, latencies[-5:]


async def test_a_claim_takes_what_it_returns_and_touches_nothing_else(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    ids = await counters(uow_factory, 30)
    await asyncio.gather(*(bump(uow_factory, ident, 10) for ident in ids))
    store = OutboxStore(engine)
    now = utcnow()
    leases = await store.lease("relay-x", busy=set(), now=now, lease_seconds=30)
    claim = await store.claim("relay-x", leases.tokens, batch_size=100, now=now, lease_seconds=30)
    assert claim.rows == 100
    claimed = {row.position for run in claim.runs for row in run}
    async with engine.connect() as conn:
        touched = await conn.scalar(
            select(func.count()).where(
                (o.c.next_attempt_at.is_not(None)) | (o.c.aggregate_seq.is_not(None))
            )
        )
    # The lane is the claim's lease: no row lock, no row written for the rows it took.
    assert touched == 0
    # One run per aggregate, each from the aggregate's head on, numbered 1, 2, 3, ...
    assert len({run[0].aggregate_id for run in claim.runs}) == len(claim.runs)
    for run in claim.runs:
        assert [row.aggregate_seq for row in run] == list(range(1, len(run) + 1))
        assert [row.position for row in run] == sorted(row.position for row in run)
    # The same relay's next claim passes over the rows in flight and what waits behind them.
    again = await store.claim(
        "relay-x", leases.tokens, batch_size=100, now=now, lease_seconds=30, skip=claimed
    )
    taken_again = {row.position for run in again.runs for row in run}
    assert not taken_again & claimed
    busy = {run[0].aggregate_id for run in claim.runs}
    assert not busy & {run[0].aggregate_id for run in again.runs}
    # A claim by another relay finds no lane of its own while relay-x holds them all.
    other = await store.lease("relay-y", busy=set(), now=now, lease_seconds=30)
    assert other.tokens == {}


async def test_a_dead_head_parks_its_aggregate_and_requeue_keeps_the_order(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    (ident,) = await counters(uow_factory, 1)
    await bump(uow_factory, ident, 4)
    publisher = MemoryPublisher()
    poison = {2}

    class Poisoned(MemoryPublisher):
        async def publish(self, envelope: Envelope) -> None:
            if envelope.data["value"] in poison:
                raise PublishError("poison")
            await publisher.publish(envelope)

    clock = FixedClock(utcnow())
    relay = OutboxRelay(
        engine, Poisoned(), settings=RelaySettings(max_attempts=2, backoff_base=1), clock=clock
    )
    await relay.run_once()
    clock.advance(timedelta(seconds=10))
    await relay.run_once()  # second attempt: dead, and its aggregate parked
    clock.advance(timedelta(days=1))
    await relay.run_once()
    assert [e.data["value"] for e in publisher.published] == [1]
    store = OutboxStore(engine)
    status = await store.status(now=clock.now())
    assert (status.dead, status.parked) == (1, 2)
    poison.clear()
    assert await store.requeue(now=clock.now()) == 1
    await relay.run_once()
    assert [e.data["value"] for e in publisher.published] == [1, 2, 3, 4]
    assert [e.sequence for e in publisher.published] == [1, 2, 3, 4]
    assert all(e.position is not None for e in publisher.published)


async def test_a_claim_reads_about_a_batch_whatever_the_backlog_and_the_relays(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    # 300 aggregates x 10 rows and four relays with a quarter of the lanes each. With one
    # batch in flight, a relay's next claim reads its batch, the rows in flight it passes
    # over, and nothing of the other relays' lanes or of the rest of the backlog.
    ids = await counters(uow_factory, 300)
    await asyncio.gather(*(bump(uow_factory, ident, 10) for ident in ids))
    store = OutboxStore(engine)
    now = utcnow()
    relays = [f"relay-{n}" for n in range(4)]
    for relay in relays:  # heartbeats first, so the lanes are shared four ways
        await store.lease(relay, busy=set(), now=now, lease_seconds=30)
    mine = None
    for _ in range(3):
        for relay in relays:
            leases = await store.lease(relay, busy=set(), now=now, lease_seconds=30)
            if relay == "relay-0":
                mine = leases
    assert mine is not None and len(mine.tokens) == 16
    first = await store.claim("relay-0", mine.tokens, batch_size=200, now=now, lease_seconds=30)
    flying = [row.position for run in first.runs for row in run]
    assert first.rows == 200
    stmt = PostgresRelaySql(engine.dialect).candidate_statement(due=False)
    params = {"lanes": sorted(mine.tokens), "batch": 200, "now": now, "skip": flying}

    def explain(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> Any:
        return "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters

    event.listen(engine.sync_engine, "before_cursor_execute", explain, retval=True)
    try:
        async with engine.connect() as conn:
            plan = (await conn.execute(stmt, params)).scalar_one()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", explain)
    scans = list(_scans(plan[0]["Plan"], "ix_qx_outbox_ready"))
    assert len(scans) == 1, plan
    read = scans[0]["Actual Rows"] + scans[0].get("Rows Removed by Filter", 0)
    # The batch plus the rows in flight it passed over: not the 3,000-row backlog.
    assert read <= 200 + len(flying), {
        k: v for k, v in scans[0].items() if "Cond" in k or "Filter" in k or "Rows" in k
    }


def _scans(node: dict[str, Any], index: str) -> Any:
    if node.get("Index Name") == index:
        yield node
    for child in node.get("Plans", ()):
        yield from _scans(child, index)


@pytest.mark.timeout(120)
async def test_twelve_relays_started_at_once_share_every_lane_within_one_lease(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    # 64 lanes over 12 relays: four hold 6, eight hold 5. A share of ceil(64 / 12) = 6 for
    # every relay let 11 relays hold every lane and the 12th none, for good.
    lease = 10.0
    schema = await current_schema(engine)
    url = engine.url.render_as_string(hide_password=False)
    engines = [
        create_engine(DatabaseSettings(url=url, pool_size=2, search_path=schema)) for _ in range(12)
    ]
    publisher = MemoryPublisher()
    settings = RelaySettings(lease_seconds=lease, poll_interval=0.2)
    relays = [
        OutboxRelay(e, publisher, settings=settings, relay_id=f"relay-{n:02}")
        for n, e in enumerate(engines)
    ]
    ids = await counters(uow_factory, 40)
    started = time.monotonic()
    tasks = [asyncio.create_task(relay.run()) for relay in relays]

    async def held() -> dict[str, int]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(lane_table.c.owner, func.count())
                .where(lane_table.c.owner.is_not(None), lane_table.c.lease_until > utcnow())
                .group_by(lane_table.c.owner)
            )
            return {str(owner): int(count) for owner, count in rows}

    async def settled() -> bool:
        shares = await held()
        return len(shares) == 12 and sorted(shares.values()) == [5] * 8 + [6] * 4

    try:
        took = await until(settled, lease, "twelve relays sharing 64 lanes")
        assert took <= lease
        # Shared out, they keep relaying: every row of every aggregate goes out once, in order.
        await asyncio.gather(*(bump(uow_factory, ident, 3) for ident in ids))

        async def drained() -> bool:
            return await unpublished(engine) == 0

        await until(drained, 30, "the outbox drained by twelve relays")
        assert await settled(), await held()
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for e in engines:
            await e.dispose()
    assert time.monotonic() - started < 60
    assert [relay.state for relay in relays] == [RelayState.STOPPED] * 12
    sequences: dict[str, list[int]] = {}
    for envelope in publisher.published:
        if envelope.aggregate_id is not None:
            sequences.setdefault(envelope.aggregate_id, []).append(envelope.sequence or 0)
    assert len(publisher.published) == len({e.id for e in publisher.published}) == 40 * 3
    assert all(seq == list(range(1, len(seq) + 1)) for seq in sequences.values()), sequences
