"""``Connecting``: a publisher's ``connect()``, one attempt at a time.

Relays in one process may share a publisher, and each turn calls ``connect()``: without a
lock two calls that both found no connection opened two, and the first was never closed
(its reader tasks outlived the relay).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

__all__ = ["Connecting"]


class Connecting(ABC):
    """Base of the broker publishers: :meth:`connect` opens the connection unless it is
    open, one caller at a time; the others wait for it and find it open."""

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
