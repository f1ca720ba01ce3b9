"""``InboxService``: the consumer's counterpart of the relay's ``serve()``, and what
``qx inbox run`` runs.

It feeds one :class:`~qx.outbox.Inbox` from the broker of ``QX_BROKER__URL`` with
``concurrency`` subscribers in one process (each its own connection: a NATS pull consumer
shares its durable, a RabbitMQ queue its consumers, a Redis or Kafka group its consumers), until
SIGTERM or SIGINT; it then stops every subscriber and returns within about a second plus the
handlers in progress. Subscribers reconnect by themselves (see :mod:`qx.outbox._subscribers`).
With ``concurrency`` > 1 an aggregate's events still apply in order, one at a time (the
inbox's sequence row serializes them).

Example:
    >>> service = InboxService(settings.broker, inbox, router, name="billing")  # doctest: +SKIP
    >>> await service.serve()                                                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from qx.core._errors import ConfigurationError
from qx.outbox._inbox import EventRouter, Inbox
from qx.outbox._signals import until_signalled
from qx.outbox._subscribers import (
    KafkaSubscriber,
    NatsSubscriber,
    RabbitSubscriber,
    RedisSubscriber,
)
from qx.outbox.publishers._select import broker_kind
from qx.settings import BrokerSettings

__all__ = ["InboxService", "subscriber_from_settings"]

Subscriber = KafkaSubscriber | NatsSubscriber | RabbitSubscriber | RedisSubscriber


def subscriber_from_settings(
    settings: BrokerSettings, inbox: Inbox[Any], router: EventRouter, *, name: str, index: int = 0
) -> Subscriber:
    """The subscriber for the broker of ``settings.url``, named ``name`` there (durable
    consumer, queue, or consumer group); ``index`` tells the instances of one process apart
    where the broker needs it (Redis consumers)."""
    kind = broker_kind(settings)
    if kind == "nats":
        return NatsSubscriber(settings, inbox, router, durable=name)
    if kind == "rabbitmq":
        return RabbitSubscriber(settings, inbox, router, queue=name)
    if kind == "redis":
        consumer = f"{socket.gethostname()}-{os.getpid()}-{index}"
        return RedisSubscriber(settings, inbox, router, group=name, consumer=consumer)
    if kind == "kafka":
        return KafkaSubscriber(settings, inbox, router, group=name)
    raise ConfigurationError(
        f"no subscriber for {kind}:// (QX_BROKER__URL): use nats://, amqp://, redis:// or kafka://"
    )


class InboxService:
    """Runs ``concurrency`` subscribers into one inbox until stopped.

    Args:
        settings: the broker.
        inbox: runs each message's handler once.
        router: handlers by event type.
        name: the durable consumer / queue / consumer group (one per service).
        concurrency: subscribers in this process.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        name: str,
        concurrency: int = 1,
    ) -> None:
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        self.subscribers = [
            subscriber_from_settings(settings, inbox, router, name=name, index=n)
            for n in range(concurrency)
        ]
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask every subscriber to stop."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until :meth:`stop`."""
        await asyncio.gather(*(subscriber.run(self._stop) for subscriber in self.subscribers))

    async def serve(self, *, ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM or SIGINT.

        Args:
            ready: called once the signal handlers are in place.
        """
        await until_signalled(self.run, self.stop, ready)
