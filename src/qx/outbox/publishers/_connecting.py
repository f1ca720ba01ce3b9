"""``Connecting``: a publisher's ``connect()``, one attempt at a time, and its ``probe()``.

Relays in one process may share a publisher, and each turn calls ``connect()``: without a
lock two calls that both found no connection opened two, and the first was never closed
(its reader tasks outlived the relay).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from qx.core._errors import BrokerUnavailable
from qx.settings import BrokerSettings

__all__ = ["Connecting"]


class Connecting(ABC):
    """Base of the broker publishers: :meth:`connect` opens the connection unless it is
    open, one caller at a time; the others wait for it and find it open; :meth:`probe` asks
    the broker for an answer now."""

    settings: BrokerSettings
    messaging_system: str

    def __init__(self) -> None:
        self._connecting = asyncio.Lock()

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether the connection is open (or reconnecting by itself)."""

    @abstractmethod
    async def _open(self) -> None:
        """Open the connection (called with no connection open)."""

    async def connect(self) -> None:
        """Connect, unless connected."""
        if self.connected:
            return
        async with self._connecting:
            if not self.connected:
                await self._open()

    @abstractmethod
    async def _ping(self) -> None:
        """One round trip to the broker on the open connection (raises if none comes)."""

    async def probe(self) -> None:
        """Return once the broker has answered a round trip sent now (``publish_timeout``).

        ``connect()`` returning says only that a client exists: NATS and aio-pika clients
        reconnect by themselves, Redis and Kafka clients connect lazily, so it returns at once
        while the broker is still gone.

        Raises:
            BrokerUnavailable: the broker did not answer.
        """
        try:
            await self.connect()
            await asyncio.wait_for(self._ping(), self.settings.publish_timeout)
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(
                f"{self.messaging_system} did not answer a probe: {exc!r}"[:300]
            ) from exc
