"""Publishers that need no broker: in memory (tests, the demo) and to the log."""

from __future__ import annotations

import logging

from qx.core._errors import PublishError
from qx.outbox._envelope import Envelope

__all__ = ["LogPublisher", "MemoryPublisher"]

logger = logging.getLogger("qx.outbox.publish")


class MemoryPublisher:
    """Keeps published envelopes in a list (tests, the demo).

    Attributes:
        published: every envelope acknowledged so far, in order.
        fail_with: when set, ``publish`` raises ``PublishError`` with this message.
    """

    messaging_system = "memory"

    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.fail_with: str | None = None

    def destination(self, envelope: Envelope) -> str:
        """The event type (there is no broker)."""
        return envelope.type

    async def connect(self) -> None:
        """Nothing to connect."""

    async def publish(self, envelope: Envelope) -> None:
        """Append the envelope (or fail, if ``fail_with`` is set)."""
        if self.fail_with is not None:
            raise PublishError(self.fail_with)
        self.published.append(envelope)

    async def close(self) -> None:
        """Nothing to close."""


class LogPublisher:
    """Logs each envelope at INFO on ``qx.outbox.publish`` (development)."""

    messaging_system = "log"

    def destination(self, envelope: Envelope) -> str:
        """The logger's name."""
        return logger.name

    async def connect(self) -> None:
        """Nothing to connect."""

    async def publish(self, envelope: Envelope) -> None:
        """Log the envelope."""
        logger.info("publish %s %s", envelope.type, envelope.to_json().decode())

    async def close(self) -> None:
        """Nothing to close."""
