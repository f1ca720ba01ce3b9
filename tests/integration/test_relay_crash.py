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
from uuid import UUID

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id
from qx.db import UnitOfWorkFactory
from qx.outbox import outbox_table
from tests import models
from tests.integration.conftest import pg_url_for
from tests.integration.helpers import drop_stream
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


async def start_relay(
    env: dict[str, str], *, wait_ready: bool = False
) -> asyncio.subprocess.Process:
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
    if wait_ready:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"relaying outbox rows" in line, line
    return process


async def produce(factory: Factory) -> list[UUID]:
    async with factory() as uow:
        counters = [models.Counter(name=f"agg{i}") for i in range(AGGREGATES)]
        await uow.counters.add_many(counters)
        await uow.commit()
    ids = [c.id for c in counters]

    async def worker(mine: list[UUID]) -> None:
        for _ in range(EVENTS_EACH):
            for ident in mine:
                async with factory() as uow:
                    (await uow.counters.require(ident)).increment(integration=True)
                    await uow.commit()

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


def check_exactly_once_in_order(envelopes: list[dict[str, Any]], ids: list[UUID]) -> None:
    assert len(envelopes) == AGGREGATES * EVENTS_EACH
    assert len({e["id"] for e in envelopes}) == len(envelopes)
    by_aggregate: dict[str, list[int]] = {}
    for envelope in envelopes:
        by_aggregate.setdefault(envelope["aggregateid"], []).append(envelope["data"]["value"])
    assert set(by_aggregate) == {str(i) for i in ids}
    expected = list(range(1, EVENTS_EACH + 1))
    out_of_order = [agg for agg, values in by_aggregate.items() if values != expected]
    assert not out_of_order, out_of_order[:3]


@pytest.mark.timeout(240)
async def test_relay_killed_repeatedly_loses_and_duplicates_nothing(
    engine: AsyncEngine, uow_factory: Factory, jetstream: tuple[str, str, str]
) -> None:
    url, prefix, stream = jetstream
    schema = await current_schema(engine)
    env = relay_env(engine, schema, url, prefix, stream)
    producer = asyncio.create_task(produce(uow_factory))
    kills = 0
    rng = random.Random(7)
    while not producer.done() or kills < 5:
        relay = await start_relay(env)
        await asyncio.sleep(rng.uniform(0.6, 2.0))
        relay.send_signal(signal.SIGKILL)
        await relay.wait()
        kills += 1
    ids = await producer
    # The killed relays did publish (part of) the backlog between kills.
    assert await pending(engine) < AGGREGATES * EVENTS_EACH
    final = await start_relay(env, wait_ready=True)
    try:
        await wait_drained(engine)
    finally:
        final.send_signal(signal.SIGTERM)  # graceful: finishes its batch and exits 0
        assert await asyncio.wait_for(final.wait(), 30) == 0
    assert kills >= 5
    check_exactly_once_in_order(await stream_contents(url, prefix, stream), ids)


@pytest.mark.timeout(240)
async def test_four_relays_at_once_keep_order(
    engine: AsyncEngine, uow_factory: Factory, jetstream: tuple[str, str, str]
) -> None:
    url, prefix, stream = jetstream
    env = relay_env(engine, await current_schema(engine), url, prefix, stream)
    relays = [await start_relay(env, wait_ready=True) for _ in range(4)]
    try:
        ids = await produce(uow_factory)
        await wait_drained(engine)
    finally:
        for relay in relays:
            relay.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(relay.wait(), 30) for relay in relays]
    assert codes == [0, 0, 0, 0]
    check_exactly_once_in_order(await stream_contents(url, prefix, stream), ids)


async def current_schema(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str(await conn.scalar(select(func.current_schema())))
