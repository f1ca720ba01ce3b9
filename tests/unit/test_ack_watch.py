"""A missing acknowledgement is the broker's fault unless it acknowledged others since."""

from __future__ import annotations

import asyncio

from qx.errors import BrokerUnavailable, PublishError
from qx.outbox.publishers._connecting import Connecting
from qx.outbox.publishers._health import AckWatch


def test_silence_since_the_send_is_the_broker_s() -> None:
    watch = AckWatch("NATS")
    watch.acknowledged()  # an acknowledgement before the send says nothing of it
    sent = watch.sent()
    error = watch.late(sent, "event 7", 5.0)
    assert isinstance(error, BrokerUnavailable)
    assert "NATS acknowledged nothing within 5s of event 7" in str(error)


def test_others_acknowledged_meanwhile_make_it_the_message_s() -> None:
    watch = AckWatch("RabbitMQ")
    sent = watch.sent()
    watch.acknowledged()
    error = watch.late(sent, "event 8", 1.5)
    assert type(error) is PublishError
    assert "did not acknowledge event 8 within 1.5s while acknowledging" in str(error)


class _Counting(Connecting):
    def __init__(self) -> None:
        super().__init__()
        self.opened = 0
        self._open_now = False

    @property
    def connected(self) -> bool:
        return self._open_now

    async def _open(self) -> None:
        self.opened += 1
        await asyncio.sleep(0)  # another caller gets in here without the lock
        self._open_now = True

    async def _ping(self) -> None:
        """Never called here."""


async def test_relays_sharing_a_publisher_open_one_connection() -> None:
    publisher = _Counting()
    await asyncio.gather(*(publisher.connect() for _ in range(5)))
    await publisher.connect()
    assert publisher.opened == 1
