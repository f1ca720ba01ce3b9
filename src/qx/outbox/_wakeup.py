"""``RelayWakeup``: tells the relays that outbox rows committed, after the writer's COMMIT.

A NOTIFY inside a transaction makes its COMMIT take a lock shared by every transaction of
the database (PostgreSQL queues notifications under one lock, held until the commit record
is flushed), so every writer that inserted an outbox row would commit one at a time. qx
therefore sends no NOTIFY from the writer's transaction. After a unit of work that wrote
outbox rows has committed, its factory's wake-up sends ``NOTIFY qx_outbox`` on a pooled
connection of its own, in a transaction of its own that is committed asynchronously (no
flush to wait for under the lock).

``commit()`` does not wait for it to be sent. The wake-up is one sender per factory and
event loop: the first commit takes a connection for it from the pool (where the commit's own
just went back: no round trip) and hands it to the sender; commits that land while a NOTIFY
is on its way ask for one more (sent after it, on the same connection, so after their
COMMIT), and the sender returns its connection and ends once nobody asked. Waiting for the
NOTIFY cost a quarter of place order's throughput once the commit itself was one round trip
(bench/place_order.py, c=1 and c=8). The relays LISTEN on the channel and poll every
``poll_interval`` anyway, so a lost wake-up (the program ended, cancelling the sender) costs
latency, never an event. The connection is taken by the commit, not by the sender, so a
program ending right after its commit cuts a NOTIFY on its way, which the driver cleans up,
never a connection being made, which it does not.

Example:
    >>> wakeup = RelayWakeup(engine)            # doctest: +SKIP
    >>> await wakeup.committed()                # after a commit that wrote outbox rows
    >>> await wakeup.settled()                  # only to wait for it (tests, shutdown)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import Pool
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # True while a sender will still look at _again before it ends: set and cleared
        # with no await between the check and the decision, so no request falls between.
        self._sending = False
        self._again = False

    async def committed(self) -> None:
        """Outbox rows just committed: a NOTIFY will be sent after that commit. Returns
        once a sender holds the connection to send it on (the commit's own, just back in
        the pool: no round trip); commits that land while one is on its way share the next."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        if self._sending and self._loop is loop:
            self._again = True
            return
        # None on its way (or only on a loop that closed: its sender never finishes).
        self._sending, self._again, self._loop = True, False, loop
        pool = self.engine.sync_engine.pool
        try:
            # Taken here, not by the sender: a program that ends right after its commit
            # then cuts a NOTIFY on its way, never a connection being made (asyncpg leaves
            # a connect it was cancelled in half made, and says so when the loop closes).
            conn = await self.engine.connect()
        except BaseException as exc:
            self._sending = False
            if not isinstance(exc, Exception):
                raise
            logger.debug("could not wake the outbox relays (%s); they will poll", exc)
            return
        task = loop.create_task(self._send(conn, pool), name="qx-relay-wakeup")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Return once no NOTIFY is on its way (each commit's has been sent)."""
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._tasks if task.get_loop() is loop]
        if tasks:
            await asyncio.wait(tasks)  # a cancelled caller does not cancel them

    async def _send(self, conn: AsyncConnection, pool: Pool) -> None:
        raw = None
        try:
            raw = await conn.get_raw_connection()
            # On the driver, outside any transaction SQLAlchemy would begin: the statement
            # is its own transaction, one round trip in the simple protocol.
            driver = raw.driver_connection
            assert driver is not None  # a checked-out connection
            while True:
                self._again = False
                await driver.execute(_NOTIFY)
                if not self._again:
                    break
        except BaseException as exc:
            self._sending = False
            # Cancelled (the loop is closing) or failed: close the socket at once, never
            # hand a connection in an unknown state back to the pool.
            terminate(raw)
            with contextlib.suppress(Exception):
                await conn.invalidate()
            if not isinstance(exc, Exception):
                raise
            # The relays' poll finds the rows; a wake-up is only a shortcut.
            logger.debug("could not wake the outbox relays (%s); they will poll", exc)
            return
        self._sending = False
        if self.engine.sync_engine.pool is pool:
            await conn.close()
        else:
            # The engine was disposed meanwhile (a program ending, a test's teardown): its
            # old pool is not used again and would drop the connection unclosed.
            await conn.invalidate()
