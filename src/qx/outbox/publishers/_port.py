"""The ``Publisher`` port: what the relay needs of a broker.

A publisher's ``publish`` returns only once the broker has acknowledged the message (NATS
JetStream PubAck, RabbitMQ publisher confirm, Redis XADD reply) and raises ``PublishError``
otherwise, so the relay marks a row published only when the broker really holds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from qx.outbox._envelope import Envelope

__all__ = ["Described", "Probed", "Publisher", "publish_many"]


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


@runtime_checkable
class Described(Protocol):
    """What a publisher tells traces about where a message goes (optional: qx's publishers
    have it; the relay's spans say ``messaging.system = "unknown"`` for one without)."""

    #: The OpenTelemetry ``messaging.system`` (``nats``, ``rabbitmq``, ``redis``, ...).
    messaging_system: str

    def destination(self, envelope: Envelope) -> str:
        """The subject, exchange or stream ``envelope`` is published to."""
        ...


@runtime_checkable
class Probed(Protocol):
    """A publisher that can ask its broker for an answer now (optional: qx's broker
    publishers have it).

    A relay that found the broker down calls ``probe()`` before it claims rows again, and
    names itself ``relaying`` only once the broker has answered. Without it the relay takes
    ``connect()`` returning as that answer, which a client that reconnects by itself (NATS,
    aio-pika's robust connection) or creates connections lazily (Redis, Kafka) gives at once
    while the broker is still gone.

    Example:
        >>> publisher = publisher_from_settings(settings)              # doctest: +SKIP
        >>> isinstance(publisher, Probed)                               # doctest: +SKIP
        True
        >>> await publisher.probe()  # BrokerUnavailable while it is gone  # doctest: +SKIP
    """

    async def probe(self) -> None:
        """Return once the broker has answered a round trip sent now.

        Raises:
            BrokerUnavailable: it did not (no connection, reconnecting, silent, refused).
        """


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
