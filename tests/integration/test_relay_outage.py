"""The broker goes away and comes back: rows wait untried, none dead, all delivered in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id
from qx.db import UnitOfWorkFactory
from qx.errors import BrokerUnavailable
from qx.outbox import Envelope, OutboxRelay, RelayState, outbox_table
from qx.outbox.publishers import Probed, Publisher, publisher_from_settings
from qx.settings import BrokerSettings, RelaySettings
from tests import models
from tests.integration.helpers import drop_stream
from tests.integration.proxy import Proxy
from tests.integration.test_relay_crash import stream_contents
from tests.services import NATS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def proxied_nats() -> AsyncIterator[tuple[Proxy, BrokerSettings, str]]:

    url = resolve(NATS)
    target = urlsplit(url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 4222)
    await proxy.start()
    tag = new_id().hex[-10:]
    settings = BrokerSettings(
        url=f"nats://127.0.0.1:{proxy.port}",
        subject_prefix=f"qxo{tag}",
        stream=f"QXO{tag}",
        publish_timeout=0.5,
    )
    yield proxy, settings, url
    await proxy.stop()
    await drop_stream(url, settings.stream)


async def bump_all(factory: Factory, counters: list[models.Counter], rounds: int) -> None:
    for _ in range(rounds):
        for counter in counters:
            async with factory() as uow:
                (await uow.counters.require(counter.id)).increment(integration=True)
                await uow.commit()


async def outbox(engine: AsyncEngine) -> list[dict[str, object]]:
    async with engine.connect() as conn:
        result = await conn.execute(select(outbox_table))
        return [dict(r._mapping) for r in result.all()]


async def until(condition: object, seconds: float, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"{what}: timed out"
        await asyncio.sleep(0.1)


class Watched:
    """Delegates to a real publisher and counts what it raised; ``calls`` names each call
    and its outcome in order (``publish``/``probe`` then ``ok``, ``down`` or ``error``)."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.unavailable = 0
        self.other: list[BaseException] = []
        self.calls: list[str] = []

    async def probe(self) -> None:
        assert isinstance(self.inner, Probed)  # a wrapper can do what it wraps can
        await self._watch("probe", self.inner.probe())

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(self, envelope: Envelope) -> None:
        await self._watch("publish", self.inner.publish(envelope))

    async def _watch(self, call: str, running: Awaitable[None]) -> None:
        try:
            await running
        except BrokerUnavailable:
            self.unavailable += 1
            self.calls.append(f"{call} down")
            raise
        except BaseException as exc:
            self.other.append(exc)
            self.calls.append(f"{call} error")
            raise
        self.calls.append(f"{call} ok")

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.timeout(120)
async def test_broker_outage_counts_no_attempt_and_dead_letters_nothing(
    engine: AsyncEngine, uow_factory: Factory, proxied_nats: tuple[Proxy, BrokerSettings, str]
) -> None:
    # With max_attempts=2, a cut that outlasts many publish attempts used to dead-letter the
    # head of every aggregate and publish their later rows past them. An unreachable broker
    # is no message's fault: attempts stay 0, nothing dies, order holds. And the relay does
    # not call itself relaying again (nor claim rows) before the broker has answered: the
    # NATS client reconnects by itself, so connect() returning proved nothing.
    proxy, settings, direct_url = proxied_nats
    async with uow_factory() as uow:
        counters = [models.Counter(name=f"o{i}") for i in range(5)]
        await uow.counters.add_many(counters)
        await uow.commit()
    publisher = Watched(publisher_from_settings(settings))
    relay = OutboxRelay(
        engine,
        publisher,
        settings=RelaySettings(
            max_attempts=2,
            backoff_base=0.2,
            backoff_max=1.0,
            poll_interval=0.1,
            reconnect_delay=0.05,
        ),
    )
    task = asyncio.create_task(relay.run())

    async def all_published() -> bool:
        return all(r["published_at"] is not None for r in await outbox(engine))

    try:
        await bump_all(uow_factory, counters, 2)
        await until(all_published, 15)
        await proxy.stop()  # the broker is gone
        await bump_all(uow_factory, counters, 4)
        seen: set[RelayState] = set()

        # More failed tries than max_attempts allows a message; a health check polling the
        # relay meanwhile.
        async def tried_often() -> bool:
            if publisher.unavailable >= 8:
                return True
            if publisher.unavailable:
                seen.add(relay.state)
            return False

        await until(tried_often, 30)
        assert relay.state is RelayState.BROKER_DOWN and seen <= {RelayState.BROKER_DOWN}
        # Once down, only probes until the broker answers: no row claimed and tried.
        assert "probe down" in publisher.calls, publisher.calls
        during = publisher.calls[publisher.calls.index("probe down") :]
        assert set(during) == {"probe down"}, during
        rows = await outbox(engine)
        assert all(r["dead_at"] is None and r["attempts"] == 0 for r in rows), rows
        assert sum(r["published_at"] is None for r in rows) == 20
        assert publisher.other == []
        await proxy.start()  # back on the same port
        await until(all_published, 30)
        assert relay.state is RelayState.RELAYING
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
    assert relay.state is RelayState.STOPPED
    rows = await outbox(engine)
    assert all(r["dead_at"] is None and r["attempts"] == 0 for r in rows) and len(rows) == 30
    envelopes = await stream_contents(direct_url, settings.subject_prefix, settings.stream)
    assert len({e["id"] for e in envelopes}) == 30
    for counter in counters:
        mine = [e for e in envelopes if e["aggregateid"] == str(counter.id)]
        values = [e["data"]["value"] for e in mine]
        # Deduplicated by JetStream: once each, in order, numbered without a gap.
        assert values == [1, 2, 3, 4, 5, 6]
        assert [e["aggregatesequence"] for e in mine] == [1, 2, 3, 4, 5, 6]
