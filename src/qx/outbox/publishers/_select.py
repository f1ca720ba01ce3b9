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

__all__ = ["publisher_from_settings"]


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
