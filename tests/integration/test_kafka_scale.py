"""Relay → Kafka at scale, with a relay killed and the broker stopped (Tansu behind a proxy).

20,000 events over 300 aggregates wait in the outbox; two ``qx outbox relay`` processes
publish them to one topic. One relay is killed with SIGKILL a quarter of the way; halfway the
broker is gone for 10 s. Meanwhile a ``KafkaSubscriber`` with the inbox consumes (through the
broker stop too). Afterwards: every row published, no attempt counted, nothing dead; every
event applied exactly once, each aggregate's in its order; and in the topic every aggregate's records sit on one partition in offset order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id
from qx.db import UnitOfWorkFactory
from qx.outbox import Envelope, EventRouter, Inbox, KafkaSubscriber
from qx.settings import BrokerSettings
from tests import models
from tests.integration.conftest import pg_url_for
from tests.integration.kafka_broker import KafkaBroker, kafka_broker
from tests.integration.test_kafka import records
from tests.integration.test_relay_crash import current_schema

Factory = UnitOfWorkFactory[models.AppUnitOfWork]
ROOT = Path(__file__).resolve().parents[2]
EVENTS = 20_000
AGGREGATES = 300


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def broker() -> AsyncIterator[KafkaBroker]:
    async with kafka_broker() as found:
        if found.proxy is None:
            pytest.skip("QX_TEST_KAFKA_URL names a broker this test cannot stop")
        yield found


async def backlog(engine: AsyncEngine) -> None:
    """The outbox rows, numbered per aggregate by the relays as they claim them."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO qx_outbox (id, event_name, event_version, aggregate_type,"
                " aggregate_id, payload, headers, occurred_at, correlation_id, tenant_id, lane)"
                " SELECT gen_random_uuid(), 'tests.scaled', 1, 'Thing', (g % :aggregates)::text,"
                " jsonb_build_object('n', g), '{}'::jsonb, now(), 'scale', 't-1',"
                " (g % :aggregates) % 64 FROM generate_series(1, :events) AS g"
            ),
            {"events": EVENTS, "aggregates": AGGREGATES},
        )


async def counts(engine: AsyncEngine) -> tuple[int, int, int]:
    """(published, rows with attempts, dead)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE published_at IS NOT NULL),"
                    " count(*) FILTER (WHERE attempts > 0), count(*) FILTER (WHERE dead_at"
                    " IS NOT NULL) FROM qx_outbox"
                )
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.timeout(300)
async def test_twenty_thousand_events_through_a_kill_and_a_broker_stop(
    engine: AsyncEngine, uow_factory: Factory, broker: KafkaBroker, tmp_path: Path
) -> None:
    assert broker.proxy is not None
    topic = f"qxs-{new_id().hex[-8:]}"
    settings = BrokerSettings(
        url=broker.url, kafka_topic=topic, kafka_partitions=6, publish_timeout=2.0, heartbeat=1.0
    )
    await backlog(engine)
    # Consumed as it is published (through the same broker stop): once each after the
    # inbox's deduplication, each aggregate in order.
    router = EventRouter()
    applied: dict[str, list[int]] = {}

    @router.on("tests.scaled")
    async def note(envelope: Envelope, uow: models.AppUnitOfWork) -> None:
        key, number = str(envelope.aggregate_id), int(envelope.sequence or 0)
        uow.on_commit(lambda: applied.setdefault(key, []).append(number))

    inbox = Inbox(uow_factory, consumer=f"scale-{topic}")
    subscriber = KafkaSubscriber(settings, inbox, router, group=inbox.consumer, batch=500)
    stop = asyncio.Event()
    task = asyncio.create_task(subscriber.run(stop))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}
        env.update(
            PYTHONPATH=str(ROOT),
            QX_DB__URL=pg_url_for(engine),
            QX_DB__SEARCH_PATH=await current_schema(engine),
            QX_BROKER__URL=broker.url,
            QX_BROKER__KAFKA_TOPIC=topic,
            QX_BROKER__PUBLISH_TIMEOUT="2",
            QX_RELAY__LEASE_SECONDS="2",
            QX_RELAY__POLL_INTERVAL="0.2",
            QX_RELAY__RECONNECT_DELAY="0.2",
        )
        relays = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from qx.cli import main; main()",
                "outbox",
                "relay",
                env=env,
                cwd=tmp_path,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for _ in range(2)
        ]

        async def reached(published: int, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while (await counts(engine))[0] < published:
                assert time.monotonic() < deadline, f"{await counts(engine)} of {published}"
                await asyncio.sleep(0.2)

        try:
            await reached(EVENTS // 4, 120)
            relays[0].send_signal(signal.SIGKILL)
            await reached(EVENTS // 2, 120)
            await broker.proxy.stop()  # gone: connections dropped, new ones refused
            await asyncio.sleep(10)  # the outage's length is this test's input
            assert (await counts(engine))[1:] == (0, 0)  # no attempt counted, nothing dead
            await broker.proxy.start()
            await reached(EVENTS, 180)
        finally:
            for relay in relays:
                if relay.returncode is None:
                    relay.send_signal(signal.SIGTERM)
            for relay in relays:
                await asyncio.wait_for(relay.wait(), 60)
        assert await counts(engine) == (EVENTS, 0, 0)

        deadline = time.monotonic() + 180
        while sum(len(v) for v in applied.values()) < EVENTS:
            assert time.monotonic() < deadline, sum(len(v) for v in applied.values())
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert len(applied) == AGGREGATES
    assert {k: v for k, v in applied.items() if v != list(range(1, len(v) + 1))} == {}
    assert inbox.counts["applied"] == EVENTS

    # In the topic: an aggregate's records on one partition, in offset order by their first
    # copies (records the killed relay sent but never marked are sent again after its lease:
    # a repeated run, at least once).
    found = await records(settings, topic, EVENTS)
    partitions: dict[str, set[int]] = {}
    numbers: dict[str, list[int]] = {}
    for record in sorted(found, key=lambda r: (r.partition, r.offset)):
        key = record.key.decode()
        partitions.setdefault(key, set()).add(record.partition)
        numbers.setdefault(key, []).append(json.loads(record.value)["aggregatesequence"])
    assert {k: p for k, p in partitions.items() if len(p) != 1} == {}
    firsts = {k: list(dict.fromkeys(n)) for k, n in numbers.items()}
    assert {k: f for k, f in firsts.items() if f != list(range(1, len(f) + 1))} == {}
    assert sum(len(f) for f in firsts.values()) == EVENTS
