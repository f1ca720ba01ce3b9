"""The ``Publisher`` port, the in-process adapters, and the choice of adapter by URL.

A publisher's ``publish`` returns only once the broker has acknowledged the message (NATS
JetStream PubAck, RabbitMQ publisher confirm, Redis XADD reply) and raises ``PublishError``
otherwise, so the relay marks a row published only when the broker really holds it.

Example:
    >>> publisher = publisher_from_settings(BrokerSettings(url="memory://"))
    >>> type(publisher).__name__
    'MemoryPublisher'
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from qx.core._errors import ConfigurationError, PublishError
from qx.outbox._envelope import Envelope
from qx.settings import BrokerSettings

__all__ = [
    "LogPublisher",
    "MemoryPublisher",
    "Publisher",
    "publish_many",
    "publisher_from_settings",
]

logger = logging.getLogger("qx.outbox.publish")


@runtime_checkable
class Publisher(Protocol):
    """Sends envelopes to a broker and waits for its acknowledgement."""

    async def connect(self) -> None:
        """Open connections (and declare streams/exchanges); safe to call again."""

    async def publish(self, envelope: Envelope) -> None:
        """Publish one envelope; return once acknowledged.

        Raises:
            PublishError: not acknowledged (broker down, refused, timed out).
        """

    async def close(self) -> None:
        """Release connections."""


async def publish_many(
    publisher: Publisher, envelopes: Sequence[Envelope]
) -> list[BaseException | None]:
    """Publish envelopes concurrently; return ``None`` or the error for each, in order.

    Uses the publisher's own ``publish_many`` when it has one (NATS pipelines the messages
    and awaits all acknowledgements together; Redis sends one pipeline).
    """
    batch = getattr(publisher, "publish_many", None)
    if batch is not None:
        results: list[BaseException | None] = await batch(envelopes)
        return results
    outcomes = await asyncio.gather(
        *(publisher.publish(envelope) for envelope in envelopes), return_exceptions=True
    )
    return [outcome if isinstance(outcome, BaseException) else None for outcome in outcomes]


class MemoryPublisher:
    """Keeps published envelopes in a list (tests, the demo).

    Attributes:
        published: every envelope acknowledged so far, in order.
        fail_with: when set, ``publish`` raises ``PublishError`` with this message.
    """

    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.fail_with: str | None = None

    async def connect(self) -> None:
        """Nothing to connect."""

    async def publish(self, envelope: Envelope) -> None:
        """Append the envelope (or fail, if ``fail_with`` is set)."""
        if self.fail_with is not None:
            raise PublishError(self.fail_with)
        self.published.append(envelope)

    async def close(self) -> None:
        """Nothing to close."""


class LogPublisher:
    """Logs each envelope at INFO on ``qx.outbox.publish`` (development)."""

    async def connect(self) -> None:
        """Nothing to connect."""

    async def publish(self, envelope: Envelope) -> None:
        """Log the envelope."""
        logger.info("publish %s %s", envelope.type, envelope.to_json().decode())

    async def close(self) -> None:
        """Nothing to close."""


def publisher_from_settings(settings: BrokerSettings) -> Publisher:
    """Return the publisher for ``settings.url`` (not yet connected).

    Raises:
        ConfigurationError: an unknown scheme, or the broker's client library is missing.
    """
    scheme = urlsplit(settings.url).scheme.lower()
    if scheme == "memory":
        return MemoryPublisher()
    if scheme == "log":
        return LogPublisher()
    if scheme in {"nats", "tls"}:
        from qx.outbox.publishers._nats import NatsPublisher

        return NatsPublisher(settings)
    if scheme in {"amqp", "amqps"}:
        from qx.outbox.publishers._rabbitmq import RabbitPublisher

        return RabbitPublisher(settings)
    if scheme in {"redis", "rediss"}:
        from qx.outbox.publishers._redis import RedisPublisher

        return RedisPublisher(settings)
    raise ConfigurationError(
        f"QX_BROKER__URL: unsupported scheme {scheme!r} in {settings.url!r} "
        "(use memory://, log://, nats://, amqp:// or redis://)"
    )
