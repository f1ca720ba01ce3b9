"""Each publisher against the real broker: envelope fields, acknowledgements, failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id, request_context
from qx.db import UnitOfWorkFactory
from qx.errors import PublishError
from qx.outbox import Envelope, OutboxRelay, outbox_table
from qx.outbox._claimed import ClaimedRow, claimed_columns
from qx.outbox.publishers import publisher_from_settings
from qx.settings import BrokerSettings, RelaySettings
from tests import models
from tests.integration.helpers import drop_stream, relay_once
from tests.services import AMQP, NATS, REDIS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


@pytest.fixture
def backend() -> str:
    """One database backend is enough here: these tests are about the brokers."""
    return "postgresql"


async def produce(factory: Factory, increments: int) -> models.Counter:
    with request_context(tenant_id="t-9", correlation_id="corr-b"):
        async with factory() as uow:
            counter = models.Counter(name="broker")
            await uow.counters.add(counter)
            await uow.commit()
        for _ in range(increments):
            async with factory() as uow:
                loaded = await uow.counters.require(counter.id)
                loaded.increment(integration=True)
                await uow.commit()
    return counter


async def pending(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(outbox_table).where(outbox_table.c.published_at.is_(None))
        )
        return [dict(r._mapping) for r in result.all()]


def check_envelope(body: bytes, counter: models.Counter, value: int) -> dict[str, Any]:
    envelope = json.loads(body)
    assert envelope["specversion"] == "1.0"
    assert envelope["type"] == "tests.counter_changed" and envelope["eventversion"] == 1
    assert envelope["source"] == "qx-tests"
    assert envelope["aggregatetype"] == "Counter" and envelope["aggregateid"] == str(counter.id)
    assert envelope["subject"] == f"Counter/{counter.id}"
    assert envelope["correlationid"] == "corr-b" and envelope["tenantid"] == "t-9"
    assert envelope["data"] == {"counter_id": str(counter.id), "value": value}
    assert Envelope.from_json(body).id.hex == envelope["id"].replace("-", "")
    return envelope


# -- NATS JetStream ----------------------------------------------------------------------------


@pytest.fixture
async def nats_settings() -> AsyncIterator[BrokerSettings]:

    url = resolve(NATS)
    tag = new_id().hex[-10:]
    settings = BrokerSettings(
        url=url,
        source="qx-tests",
        subject_prefix=f"qxt{tag}",
        stream=f"QXT{tag}",
        duplicate_window=90,
    )
    yield settings
    await drop_stream(url, settings.stream)


async def test_nats_publishes_with_msg_id_and_deduplicates(
    engine: AsyncEngine, uow_factory: Factory, nats_settings: BrokerSettings
) -> None:
    import nats

    counter = await produce(uow_factory, 2)
    publisher = publisher_from_settings(nats_settings)
    relay = OutboxRelay(engine, publisher, source="qx-tests")
    await publisher.connect()
    try:
        assert (await relay.run_once()).published == 2
        # The same envelope again (a relay that died before marking): JetStream drops it.
        async with engine.connect() as conn:
            columns = claimed_columns(outbox_table)
            row = ClaimedRow.of((await conn.execute(select(*columns).limit(1))).one())
        await publisher.publish(row.envelope(source="qx-tests"))
    finally:
        await publisher.close()
    nc = await nats.connect(nats_settings.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(nats_settings.stream)
        assert info.state.messages == 2
        # qx made the stream, with the duplicate window it was told (longer than a lease).
        assert info.config.duplicate_window == 90
        for seq, value in ((1, 1), (2, 2)):
            message = await js.get_msg(nats_settings.stream, seq)
            assert message.subject == f"{nats_settings.subject_prefix}.tests.counter_changed"
            envelope = check_envelope(message.data, counter, value)
            assert message.headers["Nats-Msg-Id"] == envelope["id"]
    finally:
        await nc.close()


async def test_nats_without_a_stream_leaves_rows_pending(
    engine: AsyncEngine, uow_factory: Factory, nats_settings: BrokerSettings
) -> None:
    await produce(uow_factory, 1)
    settings = nats_settings.model_copy(update={"create_stream": False, "publish_timeout": 1.0})
    publisher = publisher_from_settings(settings)
    result = await relay_once(engine, publisher, settings=RelaySettings(max_attempts=5))
    assert (result.published, result.failed, result.dead) == (0, 1, 0)
    (row,) = await pending(engine)
    assert row["attempts"] == 1 and "NATS refused the message" in row["last_error"]


# -- RabbitMQ ----------------------------------------------------------------------------------


@pytest.fixture
async def amqp_settings() -> AsyncIterator[BrokerSettings]:
    import aio_pika

    url = resolve(AMQP)
    settings = BrokerSettings(url=url, source="qx-tests", exchange=f"qxt.{new_id().hex[-10:]}")
    yield settings
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(settings.exchange)


async def test_rabbitmq_confirms_persistent_messages(
    engine: AsyncEngine, uow_factory: Factory, amqp_settings: BrokerSettings
) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_settings.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            amqp_settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="tests.#")
        counter = await produce(uow_factory, 2)
        publisher = publisher_from_settings(amqp_settings)
        assert (await relay_once(engine, publisher, source="qx-tests")).published == 2
        for value in (1, 2):
            message = await queue.get(timeout=5)
            assert message is not None
            await message.ack()
            envelope = check_envelope(message.body, counter, value)
            assert message.message_id == envelope["id"]
            assert message.routing_key == "tests.counter_changed"
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_rabbitmq_nack_leaves_rows_pending(
    engine: AsyncEngine, uow_factory: Factory, amqp_settings: BrokerSettings
) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_settings.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            amqp_settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # A full queue that rejects publishes: the broker nacks every message routed to it.
        queue = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await queue.bind(exchange, routing_key="#")
        await produce(uow_factory, 1)
        result = await relay_once(engine, publisher_from_settings(amqp_settings))
    assert (result.published, result.failed) == (0, 1)
    (row,) = await pending(engine)
    assert row["attempts"] == 1 and "RabbitMQ refused" in row["last_error"]


# -- Redis Streams -----------------------------------------------------------------------------


@pytest.fixture
async def redis_settings() -> AsyncIterator[BrokerSettings]:
    import redis.asyncio as redis

    url = resolve(REDIS)
    settings = BrokerSettings(
        url=url, source="qx-tests", redis_stream=f"qxt:{new_id().hex[-10:]}", redis_maxlen=1000
    )
    yield settings
    client = redis.from_url(url)
    await client.delete(settings.redis_stream)
    await client.aclose()


async def test_redis_streams_xadd(
    engine: AsyncEngine, uow_factory: Factory, redis_settings: BrokerSettings
) -> None:
    import redis.asyncio as redis

    counter = await produce(uow_factory, 2)
    publisher = publisher_from_settings(redis_settings)
    assert (await relay_once(engine, publisher, source="qx-tests")).published == 2
    client = redis.from_url(redis_settings.url)
    try:
        entries = await client.xrange(redis_settings.redis_stream)
    finally:
        await client.aclose()
    assert len(entries) == 2
    for (_, fields), value in zip(entries, (1, 2), strict=True):
        envelope = check_envelope(fields[b"envelope"], counter, value)
        assert fields[b"id"].decode() == envelope["id"]
        assert fields[b"type"] == b"tests.counter_changed"


async def test_redis_refusal_leaves_rows_pending(
    engine: AsyncEngine, uow_factory: Factory, redis_settings: BrokerSettings
) -> None:
    import redis.asyncio as redis

    client = redis.from_url(redis_settings.url)
    await client.set(redis_settings.redis_stream, "not a stream")  # XADD: WRONGTYPE
    await client.aclose()
    await produce(uow_factory, 1)
    result = await relay_once(engine, publisher_from_settings(redis_settings))
    assert (result.published, result.failed) == (0, 1)
    (row,) = await pending(engine)
    assert "Redis did not take" in row["last_error"]


async def test_unreachable_broker_is_a_publish_error() -> None:
    publisher = publisher_from_settings(
        BrokerSettings(url="redis://127.0.0.1:1/0", publish_timeout=0.5)
    )
    with pytest.raises(PublishError):
        await asyncio.wait_for(publisher.connect(), 10)


async def test_rabbitmq_unroutable_messages_are_not_lost(
    engine: AsyncEngine, uow_factory: Factory, amqp_settings: BrokerSettings
) -> None:
    await produce(uow_factory, 1)  # no queue is bound to the exchange
    result = await relay_once(engine, publisher_from_settings(amqp_settings))
    assert (result.published, result.failed) == (0, 1)
    (row,) = await pending(engine)
    assert "RabbitMQ refused" in row["last_error"]
