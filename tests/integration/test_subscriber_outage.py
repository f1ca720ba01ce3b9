"""Subscribers live through idleness and their broker going away (NATS JetStream, RabbitMQ,
Redis Streams).

Each subscriber reaches its broker through a TCP proxy while events reach the broker
directly. The broker goes away in the ways it does: every connection dropped and new ones
refused for 10 s (a cut), dropped and back at once (a restart), or a path that silently
carries nothing for 10 s (a partition: no reset, no refusal, bytes held as TCP holds them).
And a quiet stream for 30 s with every core busy. After each, the subscriber consumes what
was sent meanwhile by itself: every event's effect is applied exactly once (the inbox), and
``run()`` returns within its bound once asked to stop (what SIGTERM does in ``qx inbox run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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
)
from qx.outbox.publishers import publisher_from_settings
from qx.settings import BrokerSettings
from tests import models
from tests.integration.helpers import drop_stream, until
from tests.integration.proxy import Proxy
from tests.integration.test_inbox import envelope_for, new_counter, router_incrementing, value_of
from tests.services import AMQP, NATS, REDIS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]

CUT_SECONDS = 10.0
IDLE_SECONDS = 30.0
STOP_BOUND = 5.0


@pytest.fixture
def backend() -> str:
    return "postgresql"


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


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


@dataclass
class Line:
    """One subscriber consuming through a proxy, and what a test does with it."""

    kind: str
    proxy: Proxy
    publish: Callable[[int], Awaitable[None]]
    applied: Callable[[], Awaitable[int]]
    task: asyncio.Task[None]

    async def reaches(self, count: int, seconds: float = 60) -> None:
        async def done() -> bool:
            return await self.applied() == count

        await until(done, seconds, f"{self.kind}: {count} events applied")


@contextlib.asynccontextmanager
async def consuming(uow_factory: Factory, kind: str) -> AsyncIterator[Line]:
    """A subscriber of ``kind`` running through a proxy; on exit it is asked to stop, which
    must take at most ``STOP_BOUND`` seconds; then the broker's objects are dropped."""
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
    consumer = f"outage-{kind}-{tag}"
    inbox = Inbox(uow_factory, consumer=consumer)
    subscriber: NatsSubscriber | RabbitSubscriber | RedisSubscriber
    if kind == "nats":
        # What a connection that died had fetched comes back after 5 s, not 30.
        subscriber = NatsSubscriber(proxied, inbox, router, durable=f"d{tag}", ack_wait=5)
    elif kind == "rabbitmq":
        subscriber = RabbitSubscriber(proxied, inbox, router, queue=queue)
    else:
        subscriber = RedisSubscriber(proxied, inbox, router, group=f"g{tag}", consumer="c1")
    await _prepare(kind, direct, queue)
    publisher = publisher_from_settings(direct)
    await publisher.connect()
    stop = asyncio.Event()
    sent: list[Envelope] = []

    async def applied() -> int:
        async with uow_factory() as uow:
            found = await uow.session.scalar(
                select(func.count())
                .select_from(inbox_table)
                .where(inbox_table.c.consumer == consumer)
            )
        return int(found or 0)

    async def publish(count: int) -> None:
        for _ in range(count):
            envelope = envelope_for(ident)
            await publisher.publish(envelope)
            sent.append(envelope)

    task = asyncio.create_task(subscriber.run(stop))
    try:
        yield Line(kind, proxy, publish, applied, task)
    finally:
        stop.set()
        started = time.monotonic()
        await asyncio.wait_for(task, 30)
        stopped_in = time.monotonic() - started
        await publisher.close()
        await proxy.stop()
        await _cleanup(kind, direct, queue)
    assert stopped_in <= STOP_BOUND, (kind, stopped_in)
    with request_context(tenant_id="t-1"):
        assert await value_of(uow_factory, ident) == len(sent), kind  # every event once


@contextlib.asynccontextmanager
async def consuming_each(uow_factory: Factory) -> AsyncIterator[list[Line]]:
    """A subscriber of every broker (NATS, RabbitMQ, Redis) at once, as :func:`consuming`."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(consuming(uow_factory, kind))
            for kind in ("nats", "rabbitmq", "redis")
        ]


@pytest.mark.timeout(120)
async def test_subscribers_reconnect_after_a_cut_and_apply_every_event_once(
    uow_factory: Factory,
) -> None:
    # The three brokers at once: the cut is the same scenario for each, and its length is
    # the test's input, not something to pay three times.
    async with consuming_each(uow_factory) as lines:
        for line in lines:
            await line.publish(10)
        for line in lines:
            await line.reaches(10, 30)
        for line in lines:
            await line.proxy.stop()  # every connection dropped, new ones refused
            await line.publish(10)  # straight to the broker meanwhile
        await asyncio.sleep(CUT_SECONDS)  # the outage's length is this test's input
        assert [await line.applied() for line in lines] == [10, 10, 10]
        for line in lines:
            await line.proxy.start()  # the same port again
        for line in lines:
            await line.reaches(20)


@contextlib.asynccontextmanager
async def every_core_busy() -> AsyncIterator[None]:
    """One process spinning per core until the block ends."""
    burners = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
        for _ in range(os.cpu_count() or 2)
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            await burner.wait()


@pytest.mark.timeout(240)
async def test_subscribers_live_through_idleness_under_load_a_restart_and_a_silent_partition(
    uow_factory: Factory,
) -> None:
    """The three subscribers side by side, so the 30 s of idleness are spent once."""
    async with consuming_each(uow_factory) as lines:
        for line in lines:
            await line.publish(3)
        for line in lines:
            await line.reaches(3)
        async with every_core_busy():
            await asyncio.sleep(IDLE_SECONDS)  # a quiet stream: the idleness is the input
            assert [line.kind for line in lines if line.task.done()] == []
            for line in lines:
                await line.publish(3)
            for line in lines:
                await line.reaches(6)
        for line in lines:  # a restart: every connection dropped, back at once
            await line.proxy.stop()
            await line.proxy.start()
            await line.publish(3)
        for line in lines:
            await line.reaches(9)
        for line in lines:  # the path goes silent: no reset, no refusal
            line.proxy.partition()
            await line.publish(3)
        await asyncio.sleep(CUT_SECONDS)  # the partition's length is this test's input
        for line in lines:
            line.proxy.heal()
        # Within a few heartbeats, a connect timeout and NATS's ack_wait: not after a
        # redelivery timer meant for dead consumers (Redis's idle_seconds is 30 s).
        for line in lines:
            await line.reaches(12, 25)
        assert [line.kind for line in lines if line.task.done()] == []
