"""Where an event goes on each broker, and where a subscriber reads it: one rule for both
sides, so a publisher and its consumers cannot disagree.

An event's aggregate decides its *lane* (the relay's, :data:`~qx.outbox._table.OUTBOX_LANES`
of them) and, when ``QX_BROKER__PARTITIONS`` is set, its *partition* among that many: the
same CRC-32 of the aggregate (of the event id when there is none), so every event of an
aggregate lands in one partition. With partitions, destinations carry the partition
(``p<k>``):

==========  ====================================  =======================================
broker      partitions = 0                        partitions = N (k = partition)
==========  ====================================  =======================================
NATS        ``<prefix>.<event name>``             ``<prefix>.p<k>.<event name>``
RabbitMQ    routing key ``<event name>``          routing key ``p<k>.<event name>``
Redis       stream ``<redis_stream>``             stream ``<redis_stream>.p<k>``
Kafka       (its own partitions, by record key)   (the same)
==========  ====================================  =======================================

A consumer group then gives each partition to one consumer at a time (lane leases in the
consumer's database, :mod:`qx.outbox._partitions`), which reads it from its own durable
consumer / queue / stream.

Example:
    >>> from qx.settings import BrokerSettings
    >>> settings = BrokerSettings(subject_prefix="shop", partitions=8)
    >>> nats_filter(settings, 3)
    'shop.p3.>'
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from uuid import UUID

from qx.outbox._envelope import Envelope
from qx.settings import BrokerSettings

__all__ = [
    "aggregate_hash",
    "nats_filter",
    "nats_subject",
    "partition_of",
    "rabbit_bindings",
    "rabbit_routing_key",
    "redis_stream",
    "redis_stream_of",
]


def aggregate_hash(
    aggregate_type: str | None, aggregate_id: str | None, event_id: UUID | None
) -> int:
    """A stable hash of an event's aggregate (of its id when it has none): the same in every
    process and Python version (CRC-32, not ``hash()``)."""
    if aggregate_id is None:
        key = str(event_id).encode()
    else:
        key = f"{aggregate_type or ''}\x00{aggregate_id}".encode()
    return zlib.crc32(key)


def partition_of(settings: BrokerSettings, envelope: Envelope) -> int | None:
    """The partition ``envelope`` is published to; ``None`` when destinations carry none."""
    if not settings.partitions:
        return None
    return aggregate_hash(envelope.aggregate_type, envelope.aggregate_id, envelope.id) % (
        settings.partitions
    )


def _word(partition: int) -> str:
    return f"p{partition}"


def nats_subject(settings: BrokerSettings, envelope: Envelope) -> str:
    """The NATS subject ``envelope`` is published on."""
    partition = partition_of(settings, envelope)
    if partition is None:
        return f"{settings.subject_prefix}.{envelope.type}"
    return f"{settings.subject_prefix}.{_word(partition)}.{envelope.type}"


def nats_filter(settings: BrokerSettings, partition: int | None) -> str:
    """The subjects a consumer reads: one partition's, or every subject of the prefix."""
    if partition is None:
        return f"{settings.subject_prefix}.>"
    return f"{settings.subject_prefix}.{_word(partition)}.>"


def rabbit_routing_key(settings: BrokerSettings, envelope: Envelope) -> str:
    """The RabbitMQ routing key of ``envelope`` on the topic exchange."""
    partition = partition_of(settings, envelope)
    if partition is None:
        return envelope.type
    return f"{_word(partition)}.{envelope.type}"


def rabbit_bindings(
    settings: BrokerSettings, event_types: Sequence[str], partition: int | None
) -> list[str]:
    """The binding keys of a consumer's queue: its event types (every type when none), in
    one partition or, when routing keys carry one, in any (``*``)."""
    types = list(event_types) or ["#"]
    if partition is not None:
        return [f"{_word(partition)}.{event_type}" for event_type in types]
    if settings.partitions:
        return [f"*.{event_type}" if event_type != "#" else "#" for event_type in types]
    return types


def redis_stream(settings: BrokerSettings, envelope: Envelope) -> str:
    """The Redis stream ``envelope`` is appended to."""
    return redis_stream_of(settings, partition_of(settings, envelope))


def redis_stream_of(settings: BrokerSettings, partition: int | None) -> str:
    """The Redis stream of one partition (or the one stream when there are none)."""
    if partition is None:
        return settings.redis_stream
    return f"{settings.redis_stream}.{_word(partition)}"
