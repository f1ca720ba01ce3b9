"""Kafka: the relay publishes there and a consumer group feeds the inbox (Tansu, a
Kafka-protocol broker started for each test behind a TCP proxy).

- The relay's records: the aggregate as the key (one partition per aggregate, so offsets
  show each aggregate's order), the envelope as the value, its attributes as headers.
- The broker cut away (refusing) or gone silent (a blackhole) while the relay runs:
  attempts stay 0, nothing dead, every row goes out in order once it is back.
- A ``KafkaSubscriber`` applies every event once, each aggregate's in order, through a
  redelivery of the same records and a cut; offsets are committed only for what the inbox
  committed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id
from qx.db import UnitOfWorkFactory
from qx.outbox import Inbox, KafkaSubscriber, OutboxRelay, outbox_table
from qx.outbox.publishers import publisher_from_settings
from qx.outbox.publishers._kafka import kafka_servers
from qx.settings import BrokerSettings, RelaySettings
from tests import models
from tests.integration.helpers import until
from tests.integration.kafka_broker import KafkaBroker, kafka_broker
from tests.integration.proxy import Proxy
from tests.integration.test_inbox_order import counters, logging_router, numbered
from tests.integration.test_relay_outage import Watched, bump_all, outbox

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def broker() -> AsyncIterator[KafkaBroker]:
    async with kafka_broker() as found:
        yield found


def settings_for(broker: KafkaBroker) -> BrokerSettings:
    return BrokerSettings(
        url=broker.url,
        subject_prefix=f"qxk{new_id().hex[-8:]}",
        kafka_partitions=4,
        publish_timeout=2.0,
        heartbeat=1.0,
    )


async def records(settings: BrokerSettings, topic: str, count: int) -> list[Any]:
    """Every record of ``topic``: at least ``count``, and then on to the end of every
    partition (a relay killed mid-run sends some records twice, so ``count`` records can be
    reached with some of the rest still unread)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_servers(settings),
        group_id=f"reader-{new_id().hex[-8:]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for chunk in batch.values():
                found.extend(chunk)
            if len(found) < count or batch:
                continue
            assigned = consumer.assignment()
            ends = await consumer.end_offsets(list(assigned))
            positions = {tp: await consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                break
    finally:
        await consumer.stop()
    return found


def by_aggregate(found: list[Any]) -> dict[str, list[tuple[int, int, int]]]:
    """key -> [(partition, offset, aggregatesequence)] in offset order."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for record in sorted(found, key=lambda r: (r.partition, r.offset)):
        body = json.loads(record.value)
        out.setdefault(record.key.decode(), []).append(
            (record.partition, record.offset, body["aggregatesequence"])
        )
    return out


@pytest.mark.timeout(120)
async def test_the_relay_publishes_records_keyed_by_aggregate_in_order(
    engine: AsyncEngine, uow_factory: Factory, broker: KafkaBroker
) -> None:
    settings = settings_for(broker)
    async with uow_factory() as uow:
        made = [models.Counter(name=f"k{i}") for i in range(6)]
        await uow.counters.add_many(made)
        await uow.commit()
    await bump_all(uow_factory, made, 5)
    publisher = publisher_from_settings(settings)
    relay = OutboxRelay(engine, publisher)
    try:
        while (await relay.run_once()).claimed:
            pass
        await relay.release()
    finally:
        await publisher.close()
    assert all(r["published_at"] is not None for r in await outbox(engine))
    topic = f"{settings.subject_prefix}.tests.counter_changed"
    found = await records(settings, topic, 30)
    assert len(found) == 30
    lanes = by_aggregate(found)
    assert set(lanes) == {f"Counter/{c.id}" for c in made}
    for key, seen in lanes.items():
        assert len({partition for partition, _, _ in seen}) == 1, key  # one partition each
        assert [number for _, _, number in seen] == [1, 2, 3, 4, 5], key  # in offset order
    headers = dict(found[0].headers)
    assert headers["ce-type"] == b"tests.counter_changed"
    assert headers["ce-id"].decode() == json.loads(found[0].value)["id"]


async def _cut(proxy: Proxy) -> None:
    await proxy.stop()  # connections dropped, new ones refused


async def _cut_healed(proxy: Proxy) -> None:
    await proxy.start()  # back on the same port


async def _silence(proxy: Proxy) -> None:
    proxy.blackhole()  # connections stay open and carry nothing, no reset


async def _silence_healed(proxy: Proxy) -> None:
    # The proxy listens anew (the silent connections, which the client's request timeouts
    # had given up, are dropped) and new connections carry bytes again.
    await proxy.stop()
    proxy.blackholed = False
    await proxy.start()


FAULTS = {"cut": (_cut, _cut_healed), "silent": (_silence, _silence_healed)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_kafka_gone_counts_no_attempt_and_loses_nothing(
    engine: AsyncEngine, uow_factory: Factory, broker: KafkaBroker, fault: str
) -> None:
    """The broker goes away while the relay runs, refusing (a cut) or without a word
    (silent), then comes back: attempts stay 0, nothing dead, every row goes out in order."""
    if broker.proxy is None:
        pytest.skip("QX_TEST_KAFKA_URL names a broker this test cannot cut")
    fail, heal = FAULTS[fault]
    settings = settings_for(broker)
    async with uow_factory() as uow:
        made = [models.Counter(name=f"c{i}") for i in range(4)]
        await uow.counters.add_many(made)
        await uow.commit()
    publisher = Watched(publisher_from_settings(settings))
    relay = OutboxRelay(
        engine,
        publisher,
        settings=RelaySettings(
            max_attempts=2, backoff_base=0.2, backoff_max=1.0, poll_interval=0.1,
            reconnect_delay=0.05,
        ),
    )  # fmt: skip
    task = asyncio.create_task(relay.run())

    async def all_published() -> bool:
        return all(r["published_at"] is not None for r in await outbox(engine))

    try:
        await bump_all(uow_factory, made, 2)
        await until(all_published, 30, "the first rows")
        await fail(broker.proxy)
        await bump_all(uow_factory, made, 3)

        async def tried_often() -> bool:
            return publisher.unavailable >= 3

        await until(tried_often, 60, "publishes meeting the fault")
        rows = await outbox(engine)
        assert all(r["dead_at"] is None and r["attempts"] == 0 for r in rows), rows
        assert publisher.other == []
        await heal(broker.proxy)
        await until(all_published, 60, "the rows written during the fault")
    finally:
        relay.stop()
        await asyncio.wait_for(task, 30)
        await publisher.close()
    rows = await outbox(engine)
    assert len(rows) == 20 and all(r["dead_at"] is None and r["attempts"] == 0 for r in rows)
    found = await records(settings, f"{settings.subject_prefix}.tests.counter_changed", 20)
    lanes = by_aggregate(found)
    for counter in made:
        numbers = [n for _, _, n in lanes[f"Counter/{counter.id}"]]
        # At least once: a publish whose answer the fault swallowed may be there twice, in
        # order; each number is there.
        assert sorted(set(numbers)) == [1, 2, 3, 4, 5] and numbers == sorted(numbers), numbers


@pytest.mark.timeout(120)
async def test_a_kafka_subscriber_applies_each_event_once_in_order(
    uow_factory: Factory, broker: KafkaBroker
) -> None:
    settings = settings_for(broker)
    idents: list[UUID] = await counters(uow_factory, 3)
    router, applied = logging_router()
    inbox = Inbox(uow_factory, consumer=f"kafka-{new_id().hex[-6:]}")
    subscriber = KafkaSubscriber(settings, inbox, router, group=inbox.consumer)
    publisher = publisher_from_settings(settings)
    await publisher.connect()
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        first = [numbered(ident, n) for n in range(1, 6) for ident in idents]
        for envelope in first:
            await publisher.publish(envelope)
        await publisher.publish(first[0])  # the same record again: a duplicate
        task = asyncio.create_task(subscriber.run(stop))

        async def applied_count(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return sum(len(v) for v in applied.values()) >= count

            return check

        await until(await applied_count(15), 60, "the first 15 events")
        if broker.proxy is not None:
            await broker.proxy.stop()  # consumer and publisher lose the broker
            await asyncio.sleep(3)  # the cut's length is this test's input
            await broker.proxy.start()
        for envelope in [numbered(ident, n) for n in range(6, 11) for ident in idents]:
            await publisher.publish(envelope)
        await until(await applied_count(30), 90, "all 30 events")
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await publisher.close()
    assert applied == {str(ident): list(range(1, 11)) for ident in idents}
    assert inbox.counts["applied"] == 30
    assert select(outbox_table) is not None  # the consumer side writes no outbox rows
