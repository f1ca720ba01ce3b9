"""A publisher's ``probe()`` answers only while its broker does (NATS, RabbitMQ, Redis, Kafka).

Each broker sits behind a TCP proxy. ``connect()`` returning says only that a client exists:
the NATS and aio-pika clients reconnect by themselves, the Redis and Kafka clients connect
lazily, so it returns at once with the broker gone (asserted below, as the reason the relay
cannot trust it). ``probe()`` must raise ``BrokerUnavailable`` when the broker refuses
connections and when it is silent (a partition), and answer again once the path is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from qx.errors import BrokerUnavailable
from qx.outbox.publishers import Probed, publisher_from_settings
from qx.settings import BrokerSettings
from tests.integration.kafka_broker import kafka_broker
from tests.integration.proxy import Proxy
from tests.integration.test_relay_partition import behind_proxy


@contextlib.asynccontextmanager
async def proxied(kind: str) -> AsyncIterator[tuple[Proxy, BrokerSettings]]:
    if kind == "kafka":
        async with kafka_broker() as broker:
            if broker.proxy is None:
                pytest.skip("QX_TEST_KAFKA_URL names a broker this test cannot cut")
            yield broker.proxy, BrokerSettings(url=broker.url, publish_timeout=1.0)
        return
    async with behind_proxy(kind) as (proxy, target):
        yield proxy, target.settings


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 40
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: timed out"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
# nats-py abandons the sockets of reconnect attempts that time out on the dead path
# without closing them; they are the client library's, collected after the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["nats", "rabbitmq", "redis", "kafka"])
async def test_a_probe_answers_only_while_the_broker_does(kind: str) -> None:
    async with proxied(kind) as (proxy, settings):
        publisher = publisher_from_settings(settings)
        assert isinstance(publisher, Probed)

        async def answers() -> bool:
            try:
                await publisher.probe()
            except BrokerUnavailable:
                return False
            return True

        async def silent() -> bool:
            return not await answers()

        try:
            await publisher.probe()
            # Silent: the path delivers nothing, in either direction, and says nothing.
            proxy.partition()
            await publisher.connect()  # a client exists: no word about the broker
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(BrokerUnavailable, match=r"(?i)did not answer|not connected"):
                await publisher.probe()
            # Bounded by publish_timeout (1 s), with room for a loaded machine.
            assert loop.time() - started < 10
            proxy.heal()
            await eventually(answers, "an answer after the partition healed")
            # Refused: every connection dropped, new ones refused.
            await proxy.stop()
            await eventually(silent, "no answer once the broker is gone")
            await publisher.connect()
            for _ in range(3):  # not a moment's flicker: every probe meanwhile
                assert not await answers()
            await proxy.start()  # back on the same port
            await eventually(answers, "an answer after the broker came back")
        finally:
            proxy.heal()
            await publisher.close()
