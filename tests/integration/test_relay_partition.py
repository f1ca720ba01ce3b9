"""A silent broker partition is never charged to the messages (NATS, RabbitMQ, Redis Streams).

For each broker at once (each its own relay and database), between the relay and the broker
sits a TCP proxy that, for ten seconds, delivers nothing in
either direction and says nothing either (a blackhole: no reset, no refusal), while the
application commits 100 events over 10 aggregates. Then the path heals. Every event must
reach the broker within a lease period plus 10 s, with ``attempts`` still 0, nothing dead
or parked, and each aggregate's events first seen by the broker in the order committed.
``max_attempts=2`` makes any attempt charged to a message show up as a dead row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id
from qx.db import UnitOfWorkFactory, create_session_factory
from qx.outbox import OutboxRelay
from qx.outbox.publishers import publisher_from_settings
from qx.settings import BrokerSettings, RelaySettings
from tests import models
from tests.integration.conftest import create_tables, drop_schema, make_backend_engine
from tests.integration.helpers import drop_stream
from tests.integration.proxy import Proxy
from tests.integration.test_relay_crash import stream_contents
from tests.integration.test_relay_outage import bump_all, outbox, until
from tests.services import AMQP, NATS, REDIS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]

PARTITION_SECONDS = 10.0
LEASE_SECONDS = 5.0
AGGREGATES = 10
EVENTS_EACH = 10


@dataclass
class Broker:
    """A broker behind a proxy: the relay's settings, and how to read what it holds."""

    settings: BrokerSettings
    contents: Callable[[], Awaitable[list[dict[str, Any]]]]


def _through(proxy: Proxy, url: str) -> str:
    parts = urlsplit(url)
    netloc = f"127.0.0.1:{proxy.port}"
    if parts.username:
        netloc = f"{parts.username}:{parts.password}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def behind_proxy(kind: str) -> AsyncIterator[tuple[Proxy, Broker]]:
    url = resolve({"nats": NATS, "rabbitmq": AMQP, "redis": REDIS}[kind])
    target = urlsplit(url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 0)
    await proxy.start()
    tag = new_id().hex[-10:]
    timing = {"publish_timeout": 1.0, "heartbeat": 0.5, "source": "qx-tests"}
    if kind == "nats":
        settings = BrokerSettings(
            url=_through(proxy, url), subject_prefix=f"qxp{tag}", stream=f"QXP{tag}", **timing
        )

        async def nats_contents() -> list[dict[str, Any]]:
            return await stream_contents(url, settings.subject_prefix, settings.stream)

        yield proxy, Broker(settings, nats_contents)
        await proxy.stop()
        await drop_stream(url, settings.stream)
    elif kind == "rabbitmq":
        import aio_pika

        settings = BrokerSettings(url=_through(proxy, url), exchange=f"qxp.{tag}", **timing)
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="#")

        async def rabbit_contents() -> list[dict[str, Any]]:
            out = []
            while (message := await queue.get(timeout=5, fail=False)) is not None:
                out.append(json.loads(message.body))
                await message.ack()
            return out

        yield proxy, Broker(settings, rabbit_contents)
        await proxy.stop()
        await channel.exchange_delete(settings.exchange)
        await connection.close()
    else:
        import redis.asyncio as redis

        settings = BrokerSettings(url=_through(proxy, url), redis_stream=f"qxp:{tag}", **timing)
        client = redis.from_url(url)

        async def redis_contents() -> list[dict[str, Any]]:
            entries = await client.xrange(settings.redis_stream)
            return [json.loads(fields[b"envelope"]) for _, fields in entries]

        yield proxy, Broker(settings, redis_contents)
        await proxy.stop()
        await client.delete(settings.redis_stream)
        await client.aclose()


@pytest.mark.timeout(120)
# nats-py abandons the sockets of reconnect attempts that time out on the dead path
# without closing them; they are the client library's, collected after the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_silent_partition_publishes_everything_after_it_heals_uncharged(
    tmp_path: Path,
) -> None:
    # The three brokers at once, each with its own relay and database: the partition's
    # length is the scenario's input, not something to pay three times.
    kinds = ("nats", "rabbitmq", "redis")
    databases: list[tuple[AsyncEngine, str | None]] = []
    try:
        for _ in kinds:  # one after the other: Alembic's environment is one per process
            databases.append(await make_backend_engine("postgresql", tmp_path))
            await create_tables(databases[-1][0])
        await asyncio.gather(
            *(
                _partitioned(kind, engine)
                for kind, (engine, _) in zip(kinds, databases, strict=True)
            )
        )
    finally:
        for engine, schema in databases:
            await engine.dispose()
            if schema is not None:
                await drop_schema(schema)


async def _partitioned(kind: str, engine: AsyncEngine) -> None:
    async with behind_proxy(kind) as (proxy, target):
        await _scenario(engine, proxy, target)


async def _scenario(engine: AsyncEngine, proxy: Proxy, target: Broker) -> None:
    uow_factory = UnitOfWorkFactory(models.AppUnitOfWork, create_session_factory(engine))
    async with uow_factory() as uow:
        counters = [models.Counter(name=f"p{i}") for i in range(AGGREGATES)]
        await uow.counters.add_many(counters)
        await uow.commit()
    relay = OutboxRelay(
        engine,
        publisher_from_settings(target.settings),
        source="qx-tests",
        settings=RelaySettings(
            max_attempts=2,
            backoff_base=0.2,
            backoff_max=1.0,
            poll_interval=0.2,
            reconnect_delay=0.2,
            lease_seconds=LEASE_SECONDS,
            connect_timeout=2.0,
        ),
    )
    task = asyncio.create_task(relay.run())

    async def all_published() -> bool:
        return all(r["published_at"] is not None for r in await outbox(engine))

    try:
        await bump_all(uow_factory, counters, 1)  # the relay is connected and publishing
        await until(all_published, 15, "before the partition")
        proxy.partition()
        loop = asyncio.get_running_loop()
        cut_at = loop.time()
        await bump_all(
            uow_factory, counters, EVENTS_EACH
        )  # committed while the broker is unreachable
        # The partition lasts its length whatever the machine's speed (a scenario, not a
        # synchronisation: nothing is waited for here).
        await asyncio.sleep(max(0.0, cut_at + PARTITION_SECONDS - loop.time()))
        during = await outbox(engine)
        assert all(r["attempts"] == 0 and r["dead_at"] is None for r in during), [
            (r["attempts"], r["last_error"]) for r in during if r["attempts"]
        ][:3]
        proxy.heal()
        await until(all_published, LEASE_SECONDS + 10, "after the partition healed")
    finally:
        relay.stop()
        await asyncio.wait_for(task, 30)
    rows = await outbox(engine)
    assert len(rows) == AGGREGATES * (EVENTS_EACH + 1)
    charged = [(r["attempts"], r["last_error"]) for r in rows if r["attempts"] or r["dead_at"]]
    assert charged == [], charged[:3]
    assert all(r["next_attempt_at"] is None or r["published_at"] for r in rows)
    # What the broker holds: every event, each aggregate's first seen in commit order (a
    # message held in the dead path may arrive as well as its republished copy).
    envelopes = await target.contents()
    first_seen: dict[str, list[int]] = {}
    seen: set[str] = set()
    for envelope in envelopes:
        if envelope["id"] in seen:
            continue
        seen.add(envelope["id"])
        first_seen.setdefault(envelope["aggregateid"], []).append(envelope["data"]["value"])
    assert len(seen) == len(rows)
    for counter in counters:
        assert first_seen[str(counter.id)] == list(range(1, EVENTS_EACH + 2))
