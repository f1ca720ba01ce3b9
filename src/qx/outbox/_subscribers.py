"""Consumers for NATS JetStream, RabbitMQ and Redis Streams: decode envelopes, run them
through the inbox.

A message is acknowledged after its handler committed (or after the inbox found it a
duplicate); a failing handler's message is redelivered (NAK with a growing delay / reject
with requeue / left pending). A body that is not a qx envelope is logged and acknowledged so
it cannot block the stream.

Messages that arrive together (a fetch, a read, what the prefetch holds) are handled by
aggregate: each aggregate's in order, one at a time, different aggregates at once. An event
that arrives before its predecessor (which another consumer of the group may be applying
right now) is held a moment (``hold_seconds``) and tried again as soon as the predecessor
is in, instead of going back to the broker for a redelivery timer; so is a handler's
``ConcurrencyConflict`` (another aggregate's handler changed the same rows). Only what still
fails after that is redelivered, with the aggregate's events behind it. So a slow aggregate
holds back only itself, and no two consumers can wait on each other: the earliest unapplied
event of every aggregate can always go. A handler that keeps failing parks its message (and
its aggregate's later events behind it) in the consumer's database after the inbox's
``max_attempts`` (:meth:`Inbox.failed`); they are acknowledged, and the operator requeues
them (``qx inbox requeue``).

With ``QX_BROKER__PARTITIONS`` a NATS, RabbitMQ or Redis subscriber given ``partition=k`` reads
only that partition (:mod:`qx.outbox._destinations`), from the partition's own durable
consumer, queue or Redis consumer; :class:`~qx.outbox.InboxService` runs one per partition its
process holds.

Every subscriber lives through its broker going away: ``run(stop)`` reconnects with the one
:class:`~qx.core._backoff.Backoff` rule (a lost connection, a refused one, a broker restart,
a silent partition found by heartbeats) and resumes where the broker's consumer state says,
until ``stop`` is set; it then returns within about a second plus the handler in progress.
An idle stream is not an error.

Example:
    >>> subscriber = NatsSubscriber(
    ...     settings.broker, inbox, router, durable="billing")  # doctest: +SKIP
    >>> await subscriber.run(stop)                               # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qx.core._backoff import Backoff
from qx.core._errors import (
    ConcurrencyConflict,
    ConfigurationError,
    InvalidMessage,
    OutOfOrder,
    TransientError,
)
from qx.outbox._destinations import nats_filter, rabbit_bindings, redis_stream_of
from qx.outbox._envelope import Envelope
from qx.outbox._inbox import EventRouter, Inbox
from qx.outbox._signals import pause
from qx.outbox.publishers._kafka import kafka_servers, kafka_topic
from qx.outbox.publishers._nats import connect_nats
from qx.settings import BrokerSettings

__all__ = ["KafkaSubscriber", "NatsSubscriber", "RabbitSubscriber", "RedisSubscriber"]

logger = logging.getLogger("qx.outbox.subscribe")

#: How long a message whose handler failed waits before it is delivered again.
REDELIVERY = Backoff(1.0, 60.0)
#: How soon an event that arrived before its predecessor is delivered again.
IN_ORDER = Backoff(0.05, 2.0)
#: The pauses of an early (or conflicting) event held by the subscriber before it tries again.
HOLD = Backoff(0.005, 0.1, jitter=False)
#: How long a subscriber waits before connecting again after losing its broker.
RECONNECT = Backoff(0.5, 15.0)
#: The longest a subscriber blocks on its broker before it looks at ``stop`` again.
POLL_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as the shared loop sees it: its body and how to settle it."""

    body: bytes
    ack: Callable[[], Awaitable[None]]
    #: Have the broker deliver it again, the backoff giving the delay for its attempt.
    again: Callable[[Backoff], Awaitable[None]]


def _parsed(body: bytes) -> Envelope | None:
    try:
        return Envelope.from_json(body)
    except InvalidMessage as exc:
        logger.error("dropping a message that is not a qx envelope: %s", exc)
        return None


class _Subscriber(ABC):
    """The reconnecting loop every subscriber runs; a backend says how to consume."""

    system = "broker"

    #: How long an event that arrived before its predecessor is held before it is given
    #: back to the broker (keep it well under the broker's redelivery timeout).
    hold_seconds = 1.0

    def __init__(self, settings: BrokerSettings, inbox: Inbox[Any], router: EventRouter) -> None:
        self.settings = settings
        self.inbox = inbox
        self.router = router
        self._failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, reconnecting whenever the broker is lost."""
        while not stop.is_set():
            try:
                await self._consume(stop)
            except ConfigurationError:
                raise  # a missing extra or a bad setting does not get better by waiting
            except Exception as exc:
                self._failures += 1
                delay = RECONNECT.delay(self._failures)
                logger.warning(
                    "%s subscriber lost its broker (%s: %s); reconnecting in %.1fs",
                    self.system,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await pause(stop, delay)

    def _connected(self) -> None:
        """The broker answered: the next loss starts the backoff afresh."""
        if self._failures:
            logger.info("%s subscriber reconnected", self.system)
        self._failures = 0

    async def _settle(self, deliveries: Sequence[Delivery], stop: asyncio.Event) -> None:
        """Handle messages that arrived together: by aggregate, each aggregate's in order."""
        lanes: dict[tuple[str, str], list[tuple[Delivery, Envelope]]] = {}
        for delivery in deliveries:
            envelope = _parsed(delivery.body)
            if envelope is None:
                await delivery.ack()  # it cannot block the stream
                continue
            # Events without an aggregate share one lane, in the order they came, as
            # before lanes: nothing says their handlers do not touch the same rows.
            key = (envelope.aggregate_type or "", envelope.aggregate_id or "")
            lanes.setdefault(key, []).append((delivery, envelope))
        async with asyncio.TaskGroup() as group:
            for lane in lanes.values():
                group.create_task(self._settle_lane(lane, stop))

    async def _settle_lane(
        self, lane: list[tuple[Delivery, Envelope]], stop: asyncio.Event
    ) -> None:
        # Redeliveries come in any order: an aggregate's events go in its own order.
        lane.sort(key=lambda item: item[1].sequence or 0)
        given_back: Backoff | None = None
        for delivery, envelope in lane:
            # Once one event of the aggregate goes back to the broker, those after it would
            # only wait for it: they go back too, at once.
            again = given_back or await self._apply(envelope, stop)
            if again is None:
                await delivery.ack()
            else:
                given_back = IN_ORDER
                await delivery.again(again)

    async def _apply(self, envelope: Envelope, stop: asyncio.Event) -> Backoff | None:
        """Run one envelope through the inbox; ``None`` to acknowledge it, else the backoff
        to have it delivered again by."""
        held_until = time.monotonic() + self.hold_seconds
        tries = 0
        while True:
            tries += 1
            try:
                await self.inbox.process(envelope, self.router.dispatch)
            except (OutOfOrder, ConcurrencyConflict, TransientError) as exc:
                # Early: its predecessor is on its way, or being applied by another
                # consumer. A conflict: another lane's handler changed the same rows. Both
                # pass in a moment.
                pause = HOLD.delay(tries)
                if stop.is_set() or time.monotonic() + pause > held_until:
                    if isinstance(exc, OutOfOrder):
                        logger.debug("%s; delivering it again", exc)
                        return IN_ORDER
                    logger.warning(
                        "handler for %s (%s) failed (%s); will be redelivered",
                        envelope.type,
                        envelope.id,
                        exc,
                    )
                    return REDELIVERY
                await asyncio.sleep(pause)
                continue
            except Exception as exc:
                try:
                    parked = await self.inbox.failed(envelope, exc)
                except Exception:
                    logger.exception("cannot note the failure of %s", envelope.id)
                    parked = False
                if parked:
                    return None  # parked in the consumer's database: off the broker
                logger.exception(
                    "handler for %s (%s) failed; will be redelivered", envelope.type, envelope.id
                )
                return REDELIVERY
            return None

    @abstractmethod
    async def _consume(self, stop: asyncio.Event) -> None:
        """Connect, consume until ``stop`` is set (return) or the broker is lost (raise)."""


class NatsSubscriber(_Subscriber):
    """A durable JetStream pull consumer feeding the inbox.

    Args:
        settings: broker URL, subject prefix and stream.
        inbox: runs handlers once per message.
        router: handlers by event type; its types become the consumer's subject filters.
        durable: the durable consumer name (one per service).
        batch: messages fetched at a time.
        ack_wait: seconds JetStream waits for an acknowledgement before it delivers a
            message again, when this subscriber creates the durable consumer: messages
            fetched by a connection that died come back after it (the inbox absorbs a
            redelivery of one still being handled).
        partition: read only this partition's subjects (``QX_BROKER__PARTITIONS``; the
            durable is then that partition's alone); ``None``: every subject of the prefix.
    """

    system = "NATS"

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        durable: str,
        batch: int = 100,
        ack_wait: float = 30.0,
        partition: int | None = None,
    ) -> None:
        super().__init__(settings, inbox, router)
        self.durable = durable
        self.batch = batch
        self.ack_wait = ack_wait
        self.subject = nats_filter(settings, partition)

    async def _consume(self, stop: asyncio.Event) -> None:
        # This loop reconnects (and subscribes again); the client's own reconnection would
        # keep a dead subscription fetching nothing.
        nc = await connect_nats(self.settings, reconnect=False)
        from nats.js.api import ConsumerConfig  # importable: connect_nats found the extra

        try:
            js = nc.jetstream(timeout=self.settings.publish_timeout)
            sub = await js.pull_subscribe(
                self.subject,
                durable=self.durable,
                stream=self.settings.stream,
                config=ConsumerConfig(ack_wait=self.ack_wait),
            )
            self._connected()
            while not stop.is_set():
                if nc.is_closed:
                    raise ConnectionError("the NATS connection closed")
                try:
                    messages = await sub.fetch(self.batch, timeout=POLL_SECONDS)
                except TimeoutError:
                    # A quiet stream. nats-py raises its own TimeoutError or asyncio's
                    # (the builtin, both of them) depending on where the wait ran out.
                    continue
                await self._settle([_nats_delivery(message) for message in messages], stop)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()


class RabbitSubscriber(_Subscriber):
    """A durable queue bound to the qx exchange, feeding the inbox.

    Args:
        settings: broker URL and exchange.
        inbox: runs handlers once per message.
        router: handlers by event type; each type is bound as a routing key.
        queue: the durable queue name (one per service, or per partition).
        prefetch: unacknowledged messages in flight.
        partition: bind only this partition's routing keys (``QX_BROKER__PARTITIONS``); the
            queue then has a single active consumer, so even two members of the group that
            both believe they hold the partition (one of them late to notice it lost its
            lease) never receive its messages at once.
    """

    system = "RabbitMQ"

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        queue: str,
        prefetch: int = 100,
        partition: int | None = None,
    ) -> None:
        super().__init__(settings, inbox, router)
        self.queue = queue
        self.prefetch = prefetch
        self.partition = partition

    async def _consume(self, stop: asyncio.Event) -> None:
        try:
            import aio_pika
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("RabbitSubscriber needs the rabbitmq extra") from exc
        # A plain connection: this loop reconnects and declares everything again.
        connection = await aio_pika.connect(
            self.settings.url,
            timeout=self.settings.publish_timeout,
            heartbeat=max(int(self.settings.heartbeat), 1),
        )
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            single: Any = None
            if self.partition is not None:
                single = {"x-single-active-consumer": True}
            queue = await channel.declare_queue(self.queue, durable=True, arguments=single)
            for key in rabbit_bindings(self.settings, self.router.types, self.partition):
                await queue.bind(exchange, routing_key=key)
            self._connected()
            async with queue.iterator() as messages:
                iterator = messages.__aiter__()
                while not stop.is_set():
                    if connection.is_closed:
                        raise ConnectionError("the RabbitMQ connection closed")
                    arrived: list[Delivery] = []
                    wait = POLL_SECONDS
                    while len(arrived) < self.prefetch:
                        # The first message as it comes, then what the prefetch holds.
                        try:
                            message = await asyncio.wait_for(iterator.__anext__(), wait)
                        except TimeoutError:
                            break
                        except StopAsyncIteration:
                            raise ConnectionError("the RabbitMQ consumer was cancelled") from None
                        arrived.append(_rabbit_delivery(message))
                        wait = _GATHER_SECONDS
                    if arrived:
                        await self._settle(arrived, stop)
        finally:
            with contextlib.suppress(Exception):
                await connection.close()


class RedisSubscriber(_Subscriber):
    """A consumer group on the Redis stream the relay appends to, feeding the inbox.

    Entries are acknowledged (``XACK``) after the inbox's transaction; entries a consumer
    took and never acknowledged (it died, or its handler failed) are claimed again after
    ``idle_seconds`` by any consumer of the group (``XAUTOCLAIM``).

    Args:
        settings: broker URL and ``redis_stream``.
        inbox: runs handlers once per message.
        router: handlers by event type.
        group: the consumer group (one per service).
        consumer: this process's name in the group.
        batch: entries read at a time.
        idle_seconds: how long an unacknowledged entry waits before it is claimed again.
        partition: read this partition's stream (``<redis_stream>.p<k>``), which
            ``QX_BROKER__PARTITIONS`` requires; give the partition's own ``consumer`` name, so
            a new holder reads at once what the last one took and never acknowledged.
    """

    system = "Redis"

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        group: str,
        consumer: str,
        batch: int = 100,
        idle_seconds: float = 30.0,
        partition: int | None = None,
    ) -> None:
        super().__init__(settings, inbox, router)
        if settings.partitions and partition is None:
            raise ConfigurationError(
                f"QX_BROKER__PARTITIONS is {settings.partitions}: events are in one Redis "
                "stream per partition; give RedisSubscriber(partition=...) or run an InboxService"
            )
        self.group = group
        self.consumer = consumer
        self.batch = batch
        self.idle_seconds = idle_seconds
        self.stream = redis_stream_of(settings, partition)

    async def _consume(self, stop: asyncio.Event) -> None:
        try:
            import redis.asyncio as redis
            from redis.exceptions import ResponseError
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("RedisSubscriber needs the redis extra") from exc
        client = redis.from_url(
            self.settings.url,
            socket_timeout=POLL_SECONDS + self.settings.publish_timeout,
            socket_connect_timeout=self.settings.publish_timeout,
            health_check_interval=self.settings.heartbeat,
            socket_keepalive=True,
        )
        stream = self.stream
        try:
            try:
                await client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._connected()
            claim_from = "0-0"
            # First the entries the group gave this consumer and it never acknowledged: a
            # read sent before a partition can reach Redis after it, and the reply to a
            # dead connection still leaves the entries assigned to this name; so does a
            # restart. Read once through that history per connection (entries still failing
            # come back through XAUTOCLAIM), then new entries.
            own_from: str | None = "0-0"
            while not stop.is_set():
                entries: list[Any] = []
                if own_from is not None:
                    mine: Any = await client.xreadgroup(
                        self.group, self.consumer, {stream: own_from}, count=self.batch
                    )
                    entries = [entry for _, found in mine for entry in found]
                    own_from = entries[-1][0] if entries else None
                if not entries:
                    # Entries others took and never acknowledged.
                    claimed: Any = await client.xautoclaim(
                        stream,
                        self.group,
                        self.consumer,
                        min_idle_time=int(self.idle_seconds * 1000),
                        start_id=claim_from,
                        count=self.batch,
                    )
                    claim_from = claimed[0]
                    entries = list(claimed[1])
                if not entries:
                    read: Any = await client.xreadgroup(
                        self.group,
                        self.consumer,
                        {stream: ">"},
                        count=self.batch,
                        block=int(POLL_SECONDS * 1000),
                    )
                    entries = [entry for _, found in read for entry in found]
                arrived: list[Delivery] = []
                for entry_id, fields in entries:
                    if fields is None:  # trimmed from the stream meanwhile
                        await client.xack(stream, self.group, entry_id)
                        continue
                    arrived.append(_redis_delivery(client, stream, self.group, entry_id, fields))
                await self._settle(arrived, stop)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()


class KafkaSubscriber(_Subscriber):
    """A Kafka consumer group feeding the inbox; offsets are committed only after the inbox
    committed what they cover.

    The group's partitions are shared among its consumers by Kafka (an aggregate's events
    are on one partition: see the publisher's record key). Per partition, the committed
    offset moves past a message only once it and every message before it on that partition
    were applied (or parked): a message given back (still early, or failing) rewinds its
    partition to it, so it and those after it are read again (the inbox skips the ones
    already applied).

    Args:
        settings: broker URL (``kafka://host:port``), topics (``kafka_topic`` or one per
            event type of the router, ``<subject_prefix>.<event name>``).
        inbox: runs handlers once per message.
        router: handlers by event type; its types name the topics when there is no
            ``kafka_topic``.
        group: the consumer group (one per service).
        batch: records read at a time.
    """

    system = "Kafka"

    def __init__(
        self,
        settings: BrokerSettings,
        inbox: Inbox[Any],
        router: EventRouter,
        *,
        group: str,
        batch: int = 100,
    ) -> None:
        super().__init__(settings, inbox, router)
        self.group = group
        self.batch = batch

    def topics(self) -> list[str]:
        """The topics this subscriber reads."""
        if self.settings.kafka_topic:
            return [self.settings.kafka_topic]
        return sorted(kafka_topic(self.settings, event_type) for event_type in self.router.types)

    async def _consume(self, stop: asyncio.Event) -> None:
        try:
            from aiokafka import AIOKafkaConsumer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("KafkaSubscriber needs the kafka extra") from exc
        topics = self.topics()
        if not topics:
            raise ConfigurationError("KafkaSubscriber: the router handles no event type")
        heartbeat_ms = max(int(self.settings.heartbeat * 1000), 100)
        session_ms = max(heartbeat_ms * 5, 6000)
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=kafka_servers(self.settings),
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            heartbeat_interval_ms=heartbeat_ms,
            # A dead member's partitions go to the others after this long.
            session_timeout_ms=session_ms,
            rebalance_timeout_ms=session_ms,
            # The broker holds a JoinGroup until the rebalance is done: requests must be
            # allowed longer than that, or joining never succeeds.
            request_timeout_ms=session_ms + int(self.settings.publish_timeout * 1000),
            metadata_max_age_ms=5000,
        )
        paused: dict[Any, float] = {}  # partition -> when its redelivery is due
        try:
            await asyncio.wait_for(consumer.start(), self.settings.publish_timeout * 2)
            self._connected()
            while not stop.is_set():
                now = time.monotonic()
                due = [tp for tp, at in paused.items() if at <= now]
                if due:
                    consumer.resume(*due)
                    for tp in due:
                        del paused[tp]
                found = await consumer.getmany(
                    timeout_ms=int(POLL_SECONDS * 1000), max_records=self.batch
                )
                for partition, records in found.items():
                    settled: dict[int, float | None] = {}
                    deliveries = [_kafka_delivery(record, settled) for record in records]
                    await self._settle(deliveries, stop)
                    back = {offset: delay for offset, delay in settled.items() if delay is not None}
                    if not back:
                        await consumer.commit({partition: records[-1].offset + 1})
                        continue
                    # Read again from the first message given back, after its delay; what
                    # came before it on this partition is applied.
                    first = min(back)
                    consumer.seek(partition, first)
                    if first > records[0].offset:
                        await consumer.commit({partition: first})
                    consumer.pause(partition)
                    paused[partition] = time.monotonic() + max(back.values())
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5)


#: How long a RabbitMQ subscriber waits for more of what its prefetch holds, once one came.
_GATHER_SECONDS = 0.002


def _nats_delivery(message: Any) -> Delivery:
    async def again(backoff: Backoff) -> None:
        await message.nak(delay=backoff.delay(message.metadata.num_delivered or 1))

    return Delivery(message.data, message.ack, again)


def _rabbit_delivery(message: Any) -> Delivery:
    async def again(_backoff: Backoff) -> None:
        await message.reject(requeue=True)

    return Delivery(message.body, message.ack, again)


def _redis_delivery(client: Any, stream: str, group: str, entry_id: Any, fields: Any) -> Delivery:
    async def ack() -> None:
        await client.xack(stream, group, entry_id)

    async def again(_backoff: Backoff) -> None:
        pass  # left pending: XAUTOCLAIM gives it out again after idle_seconds

    return Delivery(fields.get(b"envelope", b""), ack, again)


def _kafka_delivery(record: Any, settled: dict[int, float | None]) -> Delivery:
    """A record whose outcome lands in ``settled``: ``None`` applied, else the seconds to
    wait before its partition is read again from it."""
    offset = int(record.offset)
    settled[offset] = 0.0  # not settled yet: read again

    async def ack() -> None:
        settled[offset] = None

    async def again(backoff: Backoff) -> None:
        settled[offset] = backoff.delay(1)

    return Delivery(record.value, ack, again)
