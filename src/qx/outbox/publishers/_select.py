"""The publisher for a broker URL (``QX_BROKER__URL``).

Example:
    >>> publisher = publisher_from_settings(BrokerSettings(url="memory://"))
    >>> type(publisher).__name__
    'MemoryPublisher'
"""

from __future__ import annotations

from urllib.parse import urlsplit

from qx.core._errors import ConfigurationError
from qx.outbox.publishers._inprocess import LogPublisher, MemoryPublisher
from qx.outbox.publishers._port import Publisher
from qx.settings import BrokerSettings

__all__ = ["broker_kind", "publisher_from_settings"]

_KINDS = {
    "memory": "memory",
    "log": "log",
    "nats": "nats",
    "tls": "nats",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "kafka": "kafka",
}


def broker_kind(settings: BrokerSettings) -> str:
    """The broker of ``settings.url``: ``memory``, ``log``, ``nats``, ``rabbitmq``, ``redis``
    or ``kafka`` (the one reading of the URL's scheme, for publishers and subscribers).

    Raises:
        ConfigurationError: an unknown scheme.
    """
    scheme = urlsplit(settings.url).scheme.lower()
    kind = _KINDS.get(scheme)
    if kind is None:
        raise ConfigurationError(
            f"QX_BROKER__URL: unsupported scheme {scheme!r} in {settings.url!r} "
            "(use memory://, log://, nats://, amqp://, redis:// or kafka://)"
        )
    return kind


def publisher_from_settings(settings: BrokerSettings) -> Publisher:
    """Return the publisher for ``settings.url`` (not yet connected).

    Raises:
        ConfigurationError: an unknown scheme, or the broker's client library is missing.
    """
    kind = broker_kind(settings)
    if kind == "memory":
        return MemoryPublisher()
    if kind == "log":
        return LogPublisher()
    if kind == "nats":
        from qx.outbox.publishers._nats import NatsPublisher

        return NatsPublisher(settings)
    if kind == "rabbitmq":
        from qx.outbox.publishers._rabbitmq import RabbitPublisher

        return RabbitPublisher(settings)
    if kind == "kafka":
        from qx.outbox.publishers._kafka import KafkaPublisher

        return KafkaPublisher(settings)
    from qx.outbox.publishers._redis import RedisPublisher

    return RedisPublisher(settings)
