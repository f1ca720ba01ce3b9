"""Publishers: one ``Publisher`` protocol, one adapter per broker, chosen by URL scheme.

The broker adapters import their client library when they connect, so each needs its extra
installed only when it is used (``qx[nats]``, ``qx[rabbitmq]``, ``qx[redis]``, ``qx[kafka]``).
"""

from qx.outbox.publishers._inprocess import LogPublisher
from qx.outbox.publishers._kafka import KafkaPublisher
from qx.outbox.publishers._nats import NatsPublisher
from qx.outbox.publishers._port import Described, Probed, Publisher, publish_many
from qx.outbox.publishers._rabbitmq import RabbitPublisher
from qx.outbox.publishers._redis import RedisPublisher
from qx.outbox.publishers._select import publisher_from_settings

__all__ = [
    "Described",
    "KafkaPublisher",
    "LogPublisher",
    "NatsPublisher",
    "Probed",
    "Publisher",
    "RabbitPublisher",
    "RedisPublisher",
    "publish_many",
    "publisher_from_settings",
]
