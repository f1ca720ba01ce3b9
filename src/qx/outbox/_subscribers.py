"""Consumers for NATS JetStream and RabbitMQ: decode envelopes, run them through the inbox.

A message is acknowledged after its handler committed (or after the inbox found it a
duplicate); a failing handler's message is redelivered (NAK / reject with requeue). A body
that is not a qx envelope is logged and acknowledged so it cannot block the stream.

Example:
    >>> subscriber = NatsSubscriber(
    ...     settings.broker, inbox, router, durable="billing")  # doctest: +SKIP
    >>> await subscriber.run(stop)                               # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from qx.core._backoff import Backoff
from qx.core._errors import ConfigurationError, InvalidMessage
from qx.outbox._envelope import Envelope
from qx.outbox._inbox import EventRouter, Inbox
from qx.settings import BrokerSettings

__all__ = ["NatsSubscriber", "RabbitSubscriber"]

logger = logging.getLogger("qx.outbox.subscribe")

#: How long a message whose handler failed waits before it is delivered again.
REDELIVERY = Backoff(1.0, 60.0)


async def _handle(inbox: Inbox[Any], router: EventRouter, body: bytes) -> bool:
    """Process one body; return ``True`` to acknowledge, ``False`` to redeliver."""
    try:
        envelope = Envelope.from_json(body)
    except InvalidMessage as exc:
        logger.error("dropping a message that is not a qx envelope: %s", exc)
        return True
    try:
        await inbox.process(envelope, router.dispatch)
    except Exception:
        logger.exception(
            "handler for %s (%s) failed; will be redelivered", envelope.type, envelope.id
        )
        return False
    return True


class NatsSubscriber:
    """A durable JetStream pull consumer feeding the inbox.

    Args:
        settings: broker URL, subject prefix and stream.
        inbox: runs handlers once per message.
        router: handlers by event type; its types become the consumer's subject filters.
        durable: the durable consumer name (one per service).
        batch: messages fetched at a time.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        durable: str,
        batch: int = 100,
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.router = router
        self.durable = durable
        self.batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set."""
        try:
            import nats
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("NatsSubscriber needs the nats extra") from exc
        nc = await nats.connect(servers=[self.settings.url], max_reconnect_attempts=-1)
        try:
            js = nc.jetstream()
            subject = f"{self.settings.subject_prefix}.>"
            sub = await js.pull_subscribe(
                subject, durable=self.durable, stream=self.settings.stream
            )
            while not stop.is_set():
                try:
                    messages = await sub.fetch(self.batch, timeout=0.5)
                except TimeoutError:
                    # A quiet stream. nats-py raises its own TimeoutError or asyncio's
                    # (the builtin, both of them) depending on where the wait ran out.
                    continue
                for message in messages:
                    if await _handle(self.inbox, self.router, message.data):
                        await message.ack()
                    else:
                        delivered = message.metadata.num_delivered or 1
                        await message.nak(delay=REDELIVERY.delay(delivered))
        finally:
            with contextlib.suppress(Exception):
                await nc.close()


class RabbitSubscriber:
    """A durable queue bound to the qx exchange, feeding the inbox.

    Args:
        settings: broker URL and exchange.
        inbox: runs handlers once per message.
        router: handlers by event type; each type is bound as a routing key.
        queue: the durable queue name (one per service).
        prefetch: unacknowledged messages in flight.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        queue: str,
        prefetch: int = 100,
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.router = router
        self.queue = queue
        self.prefetch = prefetch

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set."""
        try:
            import aio_pika
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("RabbitSubscriber needs the rabbitmq extra") from exc
        connection = await aio_pika.connect_robust(self.settings.url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(self.queue, durable=True)
            for event_type in self.router.types or ("#",):
                await queue.bind(exchange, routing_key=event_type)
            async with queue.iterator() as messages:
                async for message in _until(messages, stop):
                    if await _handle(self.inbox, self.router, message.body):
                        await message.ack()
                    else:
                        await message.reject(requeue=True)
        finally:
            with contextlib.suppress(Exception):
                await connection.close()


async def _until(messages: Any, stop: asyncio.Event) -> Any:
    """Iterate ``messages`` until ``stop`` is set (checked at least twice a second)."""
    iterator = messages.__aiter__()
    while not stop.is_set():
        try:
            yield await asyncio.wait_for(iterator.__anext__(), timeout=0.5)
        except TimeoutError:
            continue
        except StopAsyncIteration:
            return
