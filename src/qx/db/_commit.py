"""Commits whose answer was lost: finding out whether they happened.

A connection can fail after COMMIT was sent and before its answer arrives. The server may
have committed or not; the client cannot tell from the error. Retrying would apply the work
twice if it had committed. So before COMMIT the unit of work asks the backend for a handle
on its transaction (:meth:`CommitProbe.handle`), and when COMMIT fails with a lost
connection it asks a fresh connection what became of that transaction
(:meth:`CommitProbe.outcome`): committed (the commit succeeded after all), aborted (nothing
happened: safe to retry), or still unknown when ``deadline`` passes
(:class:`~qx.core.CommitOutcomeUnknown`).

PostgreSQL names its transactions: ``pg_current_xact_id_if_assigned()`` before COMMIT (one
round trip; ``NULL`` for a transaction that wrote nothing, which has nothing to lose), then
``pg_xact_status()``. SQLite commits to a local file in the same process: its COMMIT
either returns or raises, and an error means it did not commit; nothing to probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from qx.db._transaction import existing_transaction

__all__ = [
    "COMMIT_PROBE_SECONDS",
    "CommitProbe",
    "LocalProbe",
    "PostgresProbe",
    "past_cancellation",
]

logger = logging.getLogger("qx.db.commit")

#: How long a unit of work keeps asking about a commit whose answer was lost.
COMMIT_PROBE_SECONDS = 10.0


async def past_cancellation(step: Awaitable[None]) -> bool:
    """Run ``step`` to its end even when the caller is cancelled meanwhile.

    For steps that must not stop half-way. Cancelling a COMMIT does not stop it: the server
    (or SQLite's thread) goes on and may commit, while the caller would see only
    ``CancelledError``, treat the work as not done, restore its events and leave a retry
    to run it twice. A rollback cut short leaves a connection in a transaction. So a
    cancellation waits for the step's end. Returns whether one came meanwhile: the caller
    finishes its bookkeeping for the outcome it now knows, then raises it. When ``step``
    failed and a cancellation came, raises ``CancelledError`` from the failure.
    """
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():  # the step itself was cancelled, not its caller
                raise
            cancelled = True
        except BaseException as exc:
            if cancelled:
                raise asyncio.CancelledError from exc
            raise
        else:
            return cancelled


_STATUS = text("SELECT pg_xact_status(CAST(:xid AS xid8))")
_TAKE_ID = text("SELECT pg_current_xact_id()")


class CommitProbe(Protocol):
    """How a backend tells what became of a transaction whose COMMIT answer was lost."""

    async def handle(self, session: AsyncSession) -> str | None:
        """A handle on the session's transaction, taken just before COMMIT (``None``:
        nothing to find out). A backend that needs the transaction's writes done first
        flushes the session itself."""

    async def outcome(self, engine: AsyncEngine, handle: str, *, deadline: float) -> bool | None:
        """``True`` committed, ``False`` not, ``None`` not known by ``deadline``
        (``time.monotonic()``)."""


class PostgresProbe:
    """PostgreSQL's: the transaction's id, then ``pg_xact_status``."""

    async def handle(self, session: AsyncSession) -> str | None:
        # One trip into the session's greenlet for the flush and the question, not one per
        # step (each costs about as much CPU as a small statement).
        return await session.run_sync(_transaction_id)

    async def outcome(self, engine: AsyncEngine, handle: str, *, deadline: float) -> bool | None:
        pause = 0.05
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    async with engine.connect() as conn, conn.begin():
                        status = await conn.scalar(_STATUS, {"xid": int(handle)})
                        if status == "committed":
                            # A primary shows its own commits as committed before its
                            # synchronous standbys have them (and a client was told). This
                            # transaction takes an id, so its COMMIT writes a record and waits
                            # for those standbys like any other: once it returns, ours (an
                            # earlier record) is replicated as the server's policy asks, and
                            # survives a failover to them.
                            await conn.execute(_TAKE_ID)
            except Exception as exc:  # the server may be away a little longer
                logger.info("asking about transaction %s failed (%s)", handle, exc)
                status = "unreachable"
            if status == "committed":
                return True
            if status == "aborted":
                return False
            if status is None:  # too old for the server to remember: cannot happen in time
                return None
            # "in progress": the server has not yet seen the client go; or unreachable.
            if time.monotonic() + pause >= deadline:
                return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


def _transaction_id(session: Session) -> str | None:
    # The flush's writes give the transaction its id: ask after them, on the driver's own
    # connection (no SQLAlchemy statement: nothing for the session's hooks to scope).
    session.flush()
    record = existing_transaction(session)
    if record is not None and not record.connected:
        return None  # no statement ran: nothing to lose, and no connection to take for it
    if record is not None and record.transaction_id is not None:
        return record.transaction_id  # a qx write brought it back (qx.db._writes)
    fairy: Any = session.connection().connection
    found = await_only(fairy.driver_connection.fetchval("SELECT pg_current_xact_id_if_assigned()"))
    return None if found is None else str(found)


class LocalProbe:
    """SQLite's: nothing to find out (a local COMMIT returns or raises)."""

    async def handle(self, session: AsyncSession) -> str | None:
        return None

    async def outcome(self, engine: AsyncEngine, handle: str, *, deadline: float) -> bool | None:
        return None  # pragma: no cover - no handle is ever given
