"""The idempotent inbox: redelivered messages have their effect once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id, request_context, utcnow
from qx.db import UnitOfWorkFactory
from qx.errors import ConfigurationError
from qx.outbox import Envelope, EventRouter, Inbox, NatsSubscriber, inbox_table
from qx.settings import BrokerSettings
from tests import models
from tests.services import NATS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


def envelope_for(counter_id: Any) -> Envelope:
    return Envelope(
        id=new_id(),
        type="tests.counter_changed",
        version=1,
        time=utcnow(),
        source="other-service",
        data={"counter_id": str(counter_id), "value": 1},
        correlation_id="corr-in",
        tenant_id="t-1",
    )


async def new_counter(factory: Factory) -> Any:
    async with factory() as uow:
        counter = models.Counter(name=f"in-{new_id().hex[-6:]}")
        await uow.counters.add(counter)
        await uow.commit()
    return counter.id


def router_incrementing() -> tuple[EventRouter, list[str]]:
    router = EventRouter()
    seen: list[str] = []

    @router.on("tests.counter_changed")
    async def apply(envelope: Envelope, uow: models.AppUnitOfWork) -> None:
        counter = await uow.counters.require(envelope.data["counter_id"])
        counter.increment()
        seen.append(str(envelope.id))

    return router, seen


async def value_of(factory: Factory, ident: Any) -> int:
    async with factory() as uow:
        return (await uow.counters.require(ident)).value


async def test_same_message_three_times_has_its_effect_once(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    ident = await new_counter(uow_factory)
    router, _ = router_incrementing()
    inbox = Inbox(uow_factory, consumer="counting")
    envelope = envelope_for(ident)
    results = [await inbox.process(envelope, router.dispatch) for _ in range(3)]
    assert results == [True, False, False]
    assert await value_of(uow_factory, ident) == 1
    # Another consumer sees the message once too.
    assert await Inbox(uow_factory, consumer="auditing").process(envelope, router.dispatch)
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(inbox_table)) == 2


async def test_a_failing_handler_records_nothing(uow_factory: Factory) -> None:
    ident = await new_counter(uow_factory)
    inbox = Inbox(uow_factory, consumer="flaky")
    envelope = envelope_for(ident)
    calls = 0

    async def fail_once(env: Envelope, uow: models.AppUnitOfWork) -> None:
        nonlocal calls
        calls += 1
        counter = await uow.counters.require(env.data["counter_id"])
        counter.increment()
        if calls == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await inbox.process(envelope, fail_once)
    assert await inbox.process(envelope, fail_once)  # the redelivery runs it again
    assert await value_of(uow_factory, ident) == 1
    with pytest.raises(ConfigurationError):
        Inbox(uow_factory, consumer="")


@pytest.mark.postgres_only
async def test_concurrent_redeliveries_run_the_handler_once(uow_factory: Factory) -> None:
    ident = await new_counter(uow_factory)
    router, seen = router_incrementing()
    inbox = Inbox(uow_factory, consumer="racing")
    envelope = envelope_for(ident)
    results = await asyncio.gather(*(inbox.process(envelope, router.dispatch) for _ in range(3)))
    assert sorted(results) == [False, False, True]
    assert await value_of(uow_factory, ident) == 1 and len(seen) == 1


@pytest.mark.postgres_only
async def test_nats_subscriber_through_the_inbox(uow_factory: Factory) -> None:
    import nats
    from nats.js.errors import NotFoundError

    url = resolve(NATS)
    tag = new_id().hex[-10:]
    settings = BrokerSettings(url=url, subject_prefix=f"qxi{tag}", stream=f"QXI{tag}")
    ident = await new_counter(uow_factory)
    envelope = envelope_for(ident)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=settings.stream, subjects=[f"{settings.subject_prefix}.>"])
    try:
        # Three deliveries of one message (no Nats-Msg-Id: the broker keeps all three).
        for _ in range(3):
            await js.publish(f"{settings.subject_prefix}.{envelope.type}", envelope.to_json())
        await js.publish(f"{settings.subject_prefix}.garbage", b"not json")
        router, seen = router_incrementing()
        subscriber = NatsSubscriber(
            settings, Inbox(uow_factory, consumer="nats"), router, durable=f"d{tag}"
        )
        stop = asyncio.Event()
        task = asyncio.create_task(subscriber.run(stop))
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            try:
                info = await js.consumer_info(settings.stream, f"d{tag}")
            except NotFoundError:
                continue  # the subscriber has not created its consumer yet
            done = info.num_ack_pending == 0 and info.num_pending == 0
            if done and info.delivered.stream_seq == 4:
                break
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await js.delete_stream(settings.stream)
        await nc.close()
    assert seen == [str(envelope.id)]
    with request_context(tenant_id="t-1"):
        assert await value_of(uow_factory, ident) == 1


@pytest.mark.postgres_only
async def test_rabbitmq_subscriber_through_the_inbox(uow_factory: Factory) -> None:
    import aio_pika

    from qx.outbox import RabbitSubscriber
    from tests.services import AMQP

    url = resolve(AMQP)
    tag = new_id().hex[-10:]
    settings = BrokerSettings(url=url, exchange=f"qxi.{tag}")
    ident = await new_counter(uow_factory)
    envelope = envelope_for(ident)
    router, seen = router_incrementing()
    subscriber = RabbitSubscriber(
        settings, Inbox(uow_factory, consumer="rabbit"), router, queue=f"qxi-{tag}"
    )
    stop = asyncio.Event()
    task = asyncio.create_task(subscriber.run(stop))
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue_ready = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < queue_ready:  # the subscriber binds its queue
            try:
                await channel.get_queue(f"qxi-{tag}", ensure=True)
                break
            except aio_pika.exceptions.ChannelClosed:
                channel = await connection.channel()
                exchange = await channel.get_exchange(settings.exchange)
                await asyncio.sleep(0.05)
        for body in (envelope.to_json(),) * 3 + (b"garbage",):
            await exchange.publish(aio_pika.Message(body), routing_key=envelope.type)
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            queue = await channel.declare_queue(f"qxi-{tag}", durable=True, passive=True)
            if queue.declaration_result.message_count == 0 and seen:
                await asyncio.sleep(0.3)  # let the last deliveries be acknowledged
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        channel = await connection.channel()
        await channel.queue_delete(f"qxi-{tag}")
        await channel.exchange_delete(settings.exchange)
        await connection.close()
    assert seen == [str(envelope.id)]
    assert await value_of(uow_factory, ident) == 1
