"""``RelayWakeup``: tells the relays that outbox rows committed, after the writer's COMMIT.

A NOTIFY inside a transaction makes its COMMIT take a lock shared by every transaction of
the database (PostgreSQL queues notifications under one lock, held until the commit record
is flushed), so every writer that inserted an outbox row would commit one at a time. qx
therefore sends no NOTIFY from the writer's transaction. After a unit of work that wrote
outbox rows has committed, its factory's wake-up sends ``NOTIFY qx_outbox`` on a pooled
connection of its own, in a transaction of its own that is committed asynchronously (no
flush to wait for under the lock), and never more than one at a time per factory: commits
that land while one is on its way share the next. ``commit()`` returns once that NOTIFY is
sent, so no task outlives the units of work it serves (``bench/writers.py`` measured no
cost against a wake-up left running in the background). The relays LISTEN on the channel
and poll every ``poll_interval`` anyway, so a lost wake-up costs latency, never an event.

Example:
    >>> wakeup = RelayWakeup(engine)            # doctest: +SKIP
    >>> await wakeup.committed()                # after a commit that wrote outbox rows
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from qx.db._dialect import dialect_of
from qx.outbox._table import NOTIFY_CHANNEL
from qx.outbox._tx import terminate

__all__ = ["RelayWakeup"]

logger = logging.getLogger("qx.outbox.wakeup")

# One round trip: the SET LOCAL lasts until this statement's own transaction commits.
_NOTIFY = f"SELECT set_config('synchronous_commit', 'off', true), pg_notify('{NOTIFY_CHANNEL}', '')"


class RelayWakeup:
    """Wakes the relays listening on ``qx_outbox`` (PostgreSQL; elsewhere it does nothing).

    Args:
        engine: the engine the unit of work commits through.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.enabled = dialect_of(engine).notifies
        self._task: asyncio.Task[None] | None = None
        self._again = False

    async def committed(self) -> None:
        """Outbox rows just committed: return once a NOTIFY sent after that commit is
        committed too. Commits that land while one is on its way share the next one."""
        if not self.enabled:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send())
        else:
            self._again = True
        # Shielded: a cancelled caller leaves the NOTIFY to finish for the others.
        await asyncio.shield(self._task)

    async def _send(self) -> None:
        try:
            while True:
                self._again = False
                await self._notify()
                if not self._again:
                    return
        except Exception as exc:
            # The relays' poll finds the rows; a wake-up is only a shortcut.
            logger.debug("could not wake the outbox relays (%s); they will poll", exc)

    async def _notify(self) -> None:
        conn = await self.engine.connect()
        raw = None
        try:
            raw = await conn.get_raw_connection()
            # On the driver, outside any transaction SQLAlchemy would begin: the statement
            # is its own transaction, one round trip in the simple protocol.
            driver = raw.driver_connection
            assert driver is not None  # a checked-out connection
            await driver.execute(_NOTIFY)
        except BaseException:
            # Cancelled (the loop is closing) or failed: close the socket at once, never
            # hand a connection in an unknown state back to the pool.
            terminate(raw)
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise
        await conn.close()
