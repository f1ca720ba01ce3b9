"""Publishers: one ``Publisher`` protocol, one adapter per broker, chosen by URL scheme."""

from qx.outbox.publishers._port import (
    LogPublisher,
    MemoryPublisher,
    Publisher,
    publish_many,
    publisher_from_settings,
)

__all__ = [
    "LogPublisher",
    "MemoryPublisher",
    "Publisher",
    "publish_many",
    "publisher_from_settings",
]
