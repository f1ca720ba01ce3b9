"""RabbitMQ publisher (``amqp://``; needs the ``rabbitmq`` extra: aio-pika).

Envelopes go to a durable topic exchange with the event name as routing key, as persistent,
``mandatory`` messages whose ``message_id`` is the event id; the channel runs in
publisher-confirm mode, so ``publish`` returns only when the broker has taken responsibility
for the message, and raises on a nack (a queue refusing it) or a return (no queue bound).
A batch is published concurrently and its confirms awaited together.
"""

from __future__ import annotations

import contextlib
from typing import Any

from qx.core._errors import BrokerUnavailable, ConfigurationError, PublishError
from qx.outbox._destinations import rabbit_routing_key
from qx.outbox._envelope import Envelope
from qx.outbox.publishers._connecting import Connecting
from qx.outbox.publishers._health import AckWatch
from qx.settings import BrokerSettings

__all__ = ["RabbitPublisher"]


class RabbitPublisher(Connecting):
    """Publishes with publisher confirms to a topic exchange.

    Args:
        settings: ``url``, ``exchange``, ``publish_timeout``.
    """

    messaging_system = "rabbitmq"

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__()
        self.settings = settings
        self._connection: Any = None
        self._exchange: Any = None
        self._watch = AckWatch("RabbitMQ")

    def destination(self, envelope: Envelope) -> str:
        """The exchange (the routing key is the event type, and its partition when
        ``partitions`` is set: :func:`~qx.outbox._destinations.rabbit_routing_key`)."""
        return self.settings.exchange

    @property
    def connected(self) -> bool:
        return self._exchange is not None

    async def _ping(self) -> None:
        # The exchange declared again, as it is: a round trip on the channel, which the
        # robust connection closes while it reconnects. (A passive declare would not do:
        # aio-pika answers it from its cache.)
        await self._exchange.declare(timeout=self.settings.publish_timeout)

    async def _open(self) -> None:
        """Connect (robustly: aio-pika reconnects) and declare the exchange."""
        try:
            import aio_pika
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "amqp:// needs the rabbitmq extra: pip install 'qx[rabbitmq]'"
            ) from exc
        try:
            # Heartbeats find a silent connection (a partition) within about two of them,
            # and the robust connection re-establishes it.
            self._connection = await aio_pika.connect_robust(
                self.settings.url,
                timeout=self.settings.publish_timeout,
                heartbeat=max(int(self.settings.heartbeat), 1),
            )
            channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=self.settings.mandatory
            )
            self._exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        except Exception as exc:
            await self.close()
            raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc

    async def publish(self, envelope: Envelope) -> None:
        """Publish a persistent message and wait for the broker's confirm."""
        import aio_pika

        if self._exchange is None:
            await self.connect()
        message = aio_pika.Message(
            envelope.to_json(),
            message_id=str(envelope.id),
            type=envelope.type,
            content_type="application/cloudevents+json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=envelope.correlation_id,
            timestamp=envelope.time,
            headers=dict(envelope.transport_headers()),
        )
        sent_at = self._watch.sent()
        try:
            await self._exchange.publish(
                message,
                routing_key=rabbit_routing_key(self.settings, envelope),
                mandatory=self.settings.mandatory,
                timeout=self.settings.publish_timeout,
            )
        except aio_pika.exceptions.DeliveryError as exc:  # nacked, or returned unroutable
            self._watch.acknowledged()
            raise PublishError(f"RabbitMQ refused {envelope.id}: {exc!r}") from exc
        except Exception as exc:
            lost = (
                aio_pika.exceptions.ChannelInvalidStateError,
                aio_pika.exceptions.AMQPConnectionError,
                ConnectionError,
            )
            if self._connection is None or self._connection.is_closed or isinstance(exc, lost):
                # A robust connection reconnecting closes its channels meanwhile.
                raise BrokerUnavailable(f"RabbitMQ connection lost: {exc!r}") from exc
            if isinstance(exc, TimeoutError):
                raise self._watch.late(
                    sent_at, str(envelope.id), self.settings.publish_timeout
                ) from exc
            raise PublishError(f"RabbitMQ did not confirm {envelope.id}: {exc!r}") from exc
        self._watch.acknowledged()

    async def close(self) -> None:
        """Close the connection."""
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                await connection.close()
