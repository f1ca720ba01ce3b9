"""``InboxService``: the consumer's counterpart of the relay's ``serve()``, and what
``qx inbox run`` runs.

It feeds one :class:`~qx.outbox.Inbox` from the broker of ``QX_BROKER__URL`` with
``concurrency`` subscribers in one process (each its own connection: a NATS pull consumer
shares its durable, a RabbitMQ queue its consumers, a Redis or Kafka group its consumers), until
SIGTERM or SIGINT; it then stops every subscriber and returns within about a second plus the
handlers in progress. Subscribers reconnect by themselves (see :mod:`qx.outbox._subscribers`).
With ``concurrency`` > 1 an aggregate's events still apply in order, one at a time (the
inbox's sequence row serializes them). With ``QX_BROKER__PARTITIONS`` each of them is instead
a member of the consumer group holding a share of its partitions
(:mod:`qx.outbox._partitions`): an aggregate's events go to one member at a time.

Example:
    >>> service = InboxService(settings.broker, inbox, router, name="billing")  # doctest: +SKIP
    >>> await service.serve()                                                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core._errors import ConfigurationError
from qx.outbox._inbox import EventRouter, Inbox
from qx.outbox._partitions import PartitionMember, Runs
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
    settings: BrokerSettings,
    inbox: Inbox[Any],
    router: EventRouter,
    *,
    name: str,
    index: int = 0,
    partition: int | None = None,
    redeliver_after: float = 30.0,
) -> Subscriber:
    """The subscriber for the broker of ``settings.url``, named ``name`` there (durable
    consumer, queue, or consumer group); ``index`` tells the instances of one process apart
    where the broker needs it (Redis consumers).

    With ``partition``, it reads that partition alone, from the partition's own durable
    consumer (``<name>-p<k>``), queue (``<name>.p<k>``) or Redis consumer (``<name>-p<k>``
    in the group ``name``), which whoever holds the partition next reads on from.
    ``redeliver_after``: seconds before what a dead consumer took and never acknowledged is
    delivered again (NATS ``ack_wait``, Redis claim idle time; RabbitMQ requeues it as soon
    as the connection is gone).
    """
    kind = broker_kind(settings)
    if kind == "nats":
        durable = name if partition is None else f"{name}-p{partition}"
        return NatsSubscriber(
            settings,
            inbox,
            router,
            durable=durable,
            partition=partition,
            ack_wait=redeliver_after,
        )
    if kind == "rabbitmq":
        queue = name if partition is None else f"{name}.p{partition}"
        return RabbitSubscriber(settings, inbox, router, queue=queue, partition=partition)
    if kind == "redis":
        consumer = f"{socket.gethostname()}-{os.getpid()}-{index}"
        if partition is not None:
            consumer = f"{name}-p{partition}"
        return RedisSubscriber(
            settings,
            inbox,
            router,
            group=name,
            consumer=consumer,
            partition=partition,
            idle_seconds=redeliver_after,
        )
    if kind == "kafka":
        return KafkaSubscriber(settings, inbox, router, group=name)
    raise ConfigurationError(
        f"no subscriber for {kind}:// (QX_BROKER__URL): use nats://, amqp://, redis:// or kafka://"
    )


class InboxService:
    """Runs ``concurrency`` subscribers into one inbox until stopped.

    With ``QX_BROKER__PARTITIONS`` set (and a broker other than Kafka, which partitions by
    itself), each of the ``concurrency`` is a member of the consumer group holding a share of
    its partitions by leases in the inbox's database, with one subscriber per partition held
    (:class:`~qx.outbox._partitions.PartitionMember`): an aggregate's events go to one
    consumer of the group at a time, and a dead member's partitions are taken over within
    ``lease_seconds``.

    Args:
        settings: the broker.
        inbox: runs each message's handler once.
        router: handlers by event type.
        name: the durable consumer / queue / consumer group (one per service).
        concurrency: subscribers (or, with partitions, members of the group) in this process.
        lease_seconds: with partitions, how long a member's partitions outlive it.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        name: str,
        concurrency: int = 1,
        lease_seconds: float = 10.0,
    ) -> None:
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if not (isinstance(lease_seconds, int | float) and lease_seconds > 0):
            raise ConfigurationError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        self.subscribers: list[Runs] = []
        if settings.partitions and broker_kind(settings) != "kafka":
            engine = inbox.uow_factory.session_factory.kw.get("bind")
            if not isinstance(engine, AsyncEngine):
                raise ConfigurationError(
                    "QX_BROKER__PARTITIONS needs the inbox's units of work on a database "
                    "engine: the group's partitions are leased there"
                )
            process = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

            def subscriber(partition: int) -> Runs:
                return subscriber_from_settings(
                    settings,
                    inbox,
                    router,
                    name=name,
                    partition=partition,
                    redeliver_after=lease_seconds,
                )

            self.subscribers = [
                PartitionMember(
                    engine,
                    group=name,
                    member=f"{process}-{n}",
                    partitions=settings.partitions,
                    lease_seconds=lease_seconds,
                    subscriber=subscriber,
                )
                for n in range(concurrency)
            ]
        else:
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
