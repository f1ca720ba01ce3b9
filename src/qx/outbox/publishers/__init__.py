"""Publishers: one ``Publisher`` protocol, one adapter per broker, chosen by URL scheme."""

from qx.outbox.publishers.base import (
    LogPublisher,
    MemoryPublisher,
    Publisher,
    publisher_from_settings,
)

__all__ = ["LogPublisher", "MemoryPublisher", "Publisher", "publisher_from_settings"]
