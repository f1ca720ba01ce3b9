"""Running a service until SIGTERM or SIGINT, and pausing until asked to stop: one way for the
relay, the inbox service and the subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

__all__ = ["pause", "until_signalled"]


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


async def pause(flag: asyncio.Event, seconds: float) -> None:
    """Wait until ``flag`` is set or ``seconds`` pass."""
    if not flag.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(flag.wait(), timeout=seconds)
