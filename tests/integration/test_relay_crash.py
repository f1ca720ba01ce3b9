"""Relays as real processes against PostgreSQL and NATS JetStream: SIGKILLed mid-flight, or
four at once; every event arrives exactly once and in order per aggregate."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id
from qx.db import UnitOfWorkFactory
from qx.outbox import outbox_table
from qx.outbox._table import lane_table
from tests import models
from tests.integration.conftest import pg_url_for
from tests.integration.helpers import drop_stream
from tests.integration.proxy import Proxy
from tests.services import NATS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]
AGGREGATES = 200
EVENTS_EACH = 50  # 10,000 events in all


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def jetstream() -> AsyncIterator[tuple[str, str, str]]:

    url = resolve(NATS)
    tag = new_id().hex[-10:]
    prefix, stream = f"qxc{tag}", f"QXC{tag}"
    yield url, prefix, stream
    await drop_stream(url, stream)


def relay_env(
    engine: AsyncEngine, schema: str, nats_url: str, prefix: str, stream: str
) -> dict[str, str]:
    url = pg_url_for(engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}
    env.update(
        QX_DB__URL=url,
        QX_DB__SEARCH_PATH=schema,
        QX_BROKER__URL=nats_url,
        QX_BROKER__SUBJECT_PREFIX=prefix,
        QX_BROKER__STREAM=stream,
        QX_RELAY__BATCH_SIZE="200",
        QX_RELAY__POLL_INTERVAL="0.2",
        QX_RELAY__RECONNECT_DELAY="0.2",
        # A SIGKILLed relay's lanes come free after this: kept short so the test is quick.
        QX_RELAY__LEASE_SECONDS="2",
        QX_RELAY__DB_TIMEOUT="3",
    )
    return env


async def start_relay(env: dict[str, str]) -> asyncio.subprocess.Process:
    """A ``qx outbox relay`` process, returned once it says it is relaying: its SIGTERM
    handler is in place then (a SIGTERM before that kills it with -15, as any process)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from qx.cli import main; main()",
        "outbox",
        "relay",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert b"relaying outbox rows" in line, line
    return process


async def produce(
    factory: Factory, committed: list[int] | None = None, *, events_each: int = EVENTS_EACH
) -> list[UUID]:
    async with factory() as uow:
        counters = [models.Counter(name=f"agg{i}") for i in range(AGGREGATES)]
        await uow.counters.add_many(counters)
        await uow.commit()
    ids = [c.id for c in counters]

    async def worker(mine: list[UUID]) -> None:
        for _ in range(events_each):
            for ident in mine:
                async with factory() as uow:
                    (await uow.counters.require(ident)).increment(integration=True)
                    await uow.commit()
                if committed is not None:
                    committed[0] += 1

    await asyncio.gather(*(worker(ids[w::8]) for w in range(8)))
    return ids


async def pending(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        stmt = select(func.count()).where(outbox_table.c.published_at.is_(None))
        return int(await conn.scalar(stmt) or 0)


async def wait_drained(engine: AsyncEngine, seconds: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while await pending(engine):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{await pending(engine)} rows still pending")
        await asyncio.sleep(0.2)


async def stream_contents(url: str, prefix: str, stream: str) -> list[dict[str, Any]]:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        sub = await js.pull_subscribe(f"{prefix}.>", stream=stream)
        out: list[dict[str, Any]] = []
        while len(out) < info.state.messages:
            for message in await sub.fetch(1000, timeout=5):
                out.append(json.loads(message.data))
                await message.ack()
        return out
    finally:
        await nc.close()


def check_exactly_once_in_order(
    envelopes: list[dict[str, Any]], ids: list[UUID], *, events_each: int = EVENTS_EACH
) -> None:
    assert len(envelopes) == AGGREGATES * events_each
    assert len({e["id"] for e in envelopes}) == len(envelopes)
    by_aggregate: dict[str, list[int]] = {}
    for envelope in envelopes:
        by_aggregate.setdefault(envelope["aggregateid"], []).append(envelope["data"]["value"])
    assert set(by_aggregate) == {str(i) for i in ids}
    expected = list(range(1, events_each + 1))
    out_of_order = [agg for agg, values in by_aggregate.items() if values != expected]
    assert not out_of_order, out_of_order[:3]


@pytest.mark.timeout(240)
async def test_relay_killed_repeatedly_loses_and_duplicates_nothing(
    engine: AsyncEngine, uow_factory: Factory, jetstream: tuple[str, str, str]
) -> None:
    url, prefix, stream = jetstream
    schema = await current_schema(engine)
    env = relay_env(engine, schema, url, prefix, stream)
    producer = asyncio.create_task(produce(uow_factory, events_each=25))
    kills = 0
    rng = random.Random(7)
    # Four relays share the lanes; one of them, chosen at random, is killed -9 and replaced
    # again and again while the application commits.
    relays = [await start_relay(env) for _ in range(4)]
    try:
        while not producer.done() or kills < 5:
            await asyncio.sleep(rng.uniform(0.6, 2.0))
            victim = relays.pop(rng.randrange(len(relays)))
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            kills += 1
            relays.append(await start_relay(env))
        ids = await producer
        await wait_drained(engine)
    finally:
        for relay in relays:
            relay.send_signal(signal.SIGTERM)  # graceful: finishes its batch and exits 0
        codes = [await asyncio.wait_for(relay.wait(), 30) for relay in relays]
    assert codes == [0, 0, 0, 0]
    assert kills >= 5
    envelopes = await stream_contents(url, prefix, stream)
    check_exactly_once_in_order(envelopes, ids, events_each=25)


@pytest.mark.timeout(240)
async def test_four_relays_at_once_keep_order(
    engine: AsyncEngine, uow_factory: Factory, jetstream: tuple[str, str, str]
) -> None:
    url, prefix, stream = jetstream
    env = relay_env(engine, await current_schema(engine), url, prefix, stream)
    relays = [await start_relay(env) for _ in range(4)]
    try:
        ids = await produce(uow_factory, events_each=10)
        await wait_drained(engine)
    finally:
        for relay in relays:
            relay.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(relay.wait(), 30) for relay in relays]
    assert codes == [0, 0, 0, 0]
    envelopes = await stream_contents(url, prefix, stream)
    check_exactly_once_in_order(envelopes, ids, events_each=10)


async def current_schema(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str(await conn.scalar(select(func.current_schema())))


@pytest.mark.timeout(240)
async def test_a_broker_cut_and_a_database_blackhole_lose_reorder_and_duplicate_nothing(
    engine: AsyncEngine, uow_factory: Factory, jetstream: tuple[str, str, str]
) -> None:
    # Two relay processes share the outbox. Both reach NATS through one proxy, which is cut
    # while events keep being committed; then relay A's database connections go silent (a
    # blackhole, not a refusal). Relay B takes A's lanes after a lease period; A obeys
    # SIGTERM; the stream holds every event once (JetStream dedup), in order per aggregate.
    url, prefix, stream = jetstream
    schema = await current_schema(engine)
    nats_target = urlsplit(url)
    broker_proxy = Proxy(nats_target.hostname or "127.0.0.1", nats_target.port or 4222)
    db_url = make_url(pg_url_for(engine))
    db_proxy = Proxy(db_url.host or "127.0.0.1", db_url.port or 5432)
    await broker_proxy.start()
    await db_proxy.start()
    proxied_nats = f"nats://127.0.0.1:{broker_proxy.port}"
    env_b = relay_env(engine, schema, proxied_nats, prefix, stream)
    env_b.update(QX_BROKER__PUBLISH_TIMEOUT="1", QX_RELAY__MAX_ATTEMPTS="2")
    env_a = dict(env_b)
    env_a["QX_DB__URL"] = db_url.set(host="127.0.0.1", port=db_proxy.port).render_as_string(
        hide_password=False
    )
    relay_a = await start_relay(env_a)
    relay_b = await start_relay(env_b)
    committed = [0]
    producer = asyncio.create_task(produce(uow_factory, committed, events_each=20))
    try:

        async def committed_at_least(n: int) -> None:
            while committed[0] < n:
                assert not producer.done() or committed[0] >= n, "the producer stopped"
                await asyncio.sleep(0.05)

        await committed_at_least(800)
        await broker_proxy.stop()  # the broker is gone for both relays
        await committed_at_least(2000)  # while events keep coming
        await broker_proxy.start()
        await committed_at_least(2400)
        db_proxy.blackhole()  # relay A's database goes silent

        async def b_holds_every_lane() -> bool:
            async with engine.connect() as conn:
                owners = await conn.scalar(
                    select(func.count(func.distinct(lane_table.c.owner))).where(
                        lane_table.c.lease_until > func.now()
                    )
                )
            return owners == 1

        deadline = asyncio.get_running_loop().time() + 60
        while not await b_holds_every_lane():
            assert asyncio.get_running_loop().time() < deadline, "relay B never took over"
            await asyncio.sleep(0.1)
        ids = await producer
        await wait_drained(engine, seconds=90)
        relay_a.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(relay_a.wait(), 30) == 0
    finally:
        for relay in (relay_a, relay_b):
            if relay.returncode is None:
                relay.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(relay.wait(), 30) for relay in (relay_a, relay_b)]
        await broker_proxy.stop()
        await db_proxy.stop()
    assert codes == [0, 0]
    async with engine.connect() as conn:
        dead = await conn.scalar(select(func.count()).where(outbox_table.c.dead_at.is_not(None)))
        tried = await conn.scalar(select(func.max(outbox_table.c.attempts)))
    assert dead == 0 and tried == 0  # the cut was nobody's message failing
    envelopes = await stream_contents(url, prefix, stream)
    check_exactly_once_in_order(envelopes, ids, events_each=20)
    for aggregate in {e["aggregateid"] for e in envelopes}:
        numbers = [e["aggregatesequence"] for e in envelopes if e["aggregateid"] == aggregate]
        assert numbers == list(range(1, 20 + 1))
