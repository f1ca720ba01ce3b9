"""Subscribers live through their broker going away (NATS JetStream, RabbitMQ, Redis Streams).

Each subscriber reaches its broker through a TCP proxy. Events are consumed, then the proxy
drops every connection and refuses new ones for 10 s while more events reach the broker
directly; then it listens again on the same port. The subscriber reconnects by itself and
consumes the rest: every event's effect is applied exactly once (the inbox), and ``run()``
returns promptly once asked to stop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import func, select

from qx.core import new_id, request_context
from qx.db import UnitOfWorkFactory
from qx.outbox import (
    Envelope,
    Inbox,
    NatsSubscriber,
    RabbitSubscriber,
    RedisSubscriber,
    inbox_table,
    publisher_from_settings,
)
from qx.settings import BrokerSettings
from tests import models
from tests.integration.helpers import drop_stream
from tests.integration.proxy import Proxy
from tests.integration.test_inbox import envelope_for, new_counter, router_incrementing, value_of
from tests.services import AMQP, NATS, REDIS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]

CUT_SECONDS = 10.0
STOP_BOUND = 5.0


@pytest.fixture
def backend() -> str:
    return "postgresql"


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds}s")
        await asyncio.sleep(0.05)


async def _prepare(kind: str, settings: BrokerSettings, queue: str) -> None:
    """What the broker must hold before the first event: the stream / the bound queue."""
    if kind == "nats":
        publisher = publisher_from_settings(settings)
        await publisher.connect()  # creates the stream
        await publisher.close()
    elif kind == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(settings.url)
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            declared = await channel.declare_queue(queue, durable=True)
            await declared.bind(exchange, routing_key="tests.counter_changed")
        finally:
            await connection.close()


async def _cleanup(kind: str, settings: BrokerSettings, queue: str) -> None:
    if kind == "nats":
        await drop_stream(settings.url, settings.stream)
    elif kind == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(settings.url)
        try:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.exchange_delete(settings.exchange)
        finally:
            await connection.close()
    else:
        import redis.asyncio as redis

        client = redis.from_url(settings.url)
        try:
            await client.delete(settings.redis_stream)
        finally:
            await client.aclose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["nats", "rabbitmq", "redis"])
async def test_a_subscriber_reconnects_after_a_cut_and_applies_every_event_once(
    uow_factory: Factory, kind: str
) -> None:
    url = resolve({"nats": NATS, "rabbitmq": AMQP, "redis": REDIS}[kind])
    tag = new_id().hex[-10:]
    direct = BrokerSettings(
        url=url,
        subject_prefix=f"qxo{tag}",
        stream=f"QXO{tag}",
        exchange=f"qxo.{tag}",
        redis_stream=f"qxo:{tag}",
        heartbeat=1.0,
    )
    queue = f"qxo-{tag}"
    target = urlsplit(url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 0)
    await proxy.start()
    proxied = direct.model_copy(update={"url": _via(url, proxy.port)})
    ident = await new_counter(uow_factory)
    router, _seen = router_incrementing()
    inbox = Inbox(uow_factory, consumer=f"outage-{kind}")
    subscriber: NatsSubscriber | RabbitSubscriber | RedisSubscriber
    if kind == "nats":
        subscriber = NatsSubscriber(proxied, inbox, router, durable=f"d{tag}")
    elif kind == "rabbitmq":
        subscriber = RabbitSubscriber(proxied, inbox, router, queue=queue)
    else:
        subscriber = RedisSubscriber(proxied, inbox, router, group=f"g{tag}", consumer="c1")
    await _prepare(kind, direct, queue)
    publisher = publisher_from_settings(direct)
    await publisher.connect()
    stop = asyncio.Event()
    task = asyncio.create_task(subscriber.run(stop))

    async def applied() -> int:
        async with uow_factory() as uow:
            found = await uow.session.scalar(
                select(func.count())
                .select_from(inbox_table)
                .where(inbox_table.c.consumer == f"outage-{kind}")
            )
        return int(found or 0)

    async def publish(count: int) -> list[Envelope]:
        sent = [envelope_for(ident) for _ in range(count)]
        for envelope in sent:
            await publisher.publish(envelope)
        return sent

    try:
        await publish(10)

        async def first_ten() -> bool:
            return await applied() == 10

        await until(first_ten, 30, "the first 10 events")
        await proxy.stop()  # every connection dropped, new ones refused
        await publish(10)  # straight to the broker meanwhile
        await asyncio.sleep(CUT_SECONDS)  # the outage's length is this test's input
        assert await applied() == 10
        await proxy.start()  # the same port again

        async def all_twenty() -> bool:
            return await applied() == 20

        await until(all_twenty, 60, "the 10 events sent during the cut")
    finally:
        stop.set()
        started = time.monotonic()
        await asyncio.wait_for(task, 30)
        stopped_in = time.monotonic() - started
        await publisher.close()
        await proxy.stop()
        await _cleanup(kind, direct, queue)
    assert stopped_in <= STOP_BOUND, stopped_in
    with request_context(tenant_id="t-1"):
        assert await value_of(uow_factory, ident) == 20  # every event once
