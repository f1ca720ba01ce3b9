"""Running a service until SIGTERM or SIGINT: one way for the relay and the inbox service."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

__all__ = ["until_signalled"]


async def until_signalled(
    run: Callable[[], Awaitable[None]],
    stop: Callable[[], None],
    ready: Callable[[], None] | None = None,
) -> None:
    """Await ``run()``, calling ``stop()`` on SIGTERM or SIGINT; ``ready()`` once the
    handlers are in place. The handlers are removed when ``run()`` ends."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    if ready is not None:
        ready()
    try:
        await run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
