"""Commits whose answer was lost: finding out whether they happened.

A connection can fail after COMMIT was sent and before its answer arrives. The server may
have committed or not; the client cannot tell from the error. Retrying would apply the work
twice if it had committed. So before COMMIT the unit of work asks the backend for a handle
on its transaction (:meth:`CommitProbe.handle`), and when COMMIT fails with a lost
connection it asks a fresh connection what became of that transaction
(:meth:`CommitProbe.outcome`): committed (the commit succeeded after all), aborted (nothing
happened: safe to retry), or still unknown when ``deadline`` passes
(:class:`~qx.core.CommitOutcomeUnknown`).

PostgreSQL names its transactions, but a transaction id names one transaction only within
one run of one server. A server restarted after a crash, or a standby promoted after a
failover, continues from the last id its WAL holds: a transaction whose records never
reached it leaves its id free, and the next transaction there takes it. Asked about the id
afterwards, the server answers for that other transaction ("committed"), and a commit that
was lost would be reported done. So the handle is the id *and* the server run that gave it
(the postmaster's start time; a promotion never happens inside a run that assigned ids as a
primary, and a restart starts a new run): within the same run the server's answer is about
our transaction; from another run only an answer that rules our transaction out is taken
(an id not reached yet, aborted, or running), and "committed" is unknown. The handle is
taken with ``pg_current_xact_id_if_assigned()`` before COMMIT (one round trip; ``NULL`` for
a transaction that wrote nothing, which has nothing to lose), or returned by qx's own first
write, an INSERT or a changed root's UPDATE (:mod:`qx.db._writes`); the question is asked
with ``pg_xact_status()``.

A transaction that is one statement (the new aggregates' rows and the outbox's, held back to
COMMIT: see :mod:`qx.db._writes`) is sent without BEGIN and COMMIT: the server commits the
statement on its own, in one round trip instead of three. Its answer can be lost the same
way, and no transaction id comes back before it. Its handle is instead a row it writes whose
key was made for it (an outbox row's new event id), and the server session that ran it (its
backend's process id and start time, read once per connection, and the server run). After a
lost answer a fresh connection ends that backend if it is still there
(``pg_terminate_backend``: the statement has then committed, or never will) and waits until
it is gone; then the row, present or not, is the answer. On another server run the backend
is gone with its run, and the row answers at once (a key made for the statement is not
given again).

SQLite commits in the process: no answer is lost on a wire, but its own COMMIT can fail. A
busy or locked database, a deferred constraint or an interrupt leave the transaction undone
(safe to retry); an I/O error, a full disk or a corrupt file can come after the commit record
reached the write-ahead log, and SQLite does not say which. So a transaction on an SQLite
file that wrote something also writes a *commit marker*, a row of its own in ``qx_commit``
(one more INSERT, in the same trip as the flush). After an ambiguous COMMIT a fresh
connection tries to write the same marker, in a transaction of its own: the key is taken
(our transaction committed), or the fence commits, and then ours never can: the fence's
frames take the place in the write-ahead log where ours would have been found on recovery,
and its row holds the key. Failing that until the deadline, the outcome is unknown. Markers
older than an hour are deleted now and then by the commits themselves. An in-memory database
has no second connection to ask: its ambiguous COMMIT is unknown.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable
from typing import Any, Final, NamedTuple, Protocol

from sqlalchemy import Column, Connection, Select, literal, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from qx.db._driver import fetch_row
from qx.db._transaction import existing_transaction
from qx.db._translate import lost_connection

__all__ = [
    "BACKEND_KEY",
    "COMMIT_PROBE_SECONDS",
    "LOCAL_HANDLE",
    "UNDONE",
    "Backend",
    "CommitProbe",
    "PostgresProbe",
    "RowHandle",
    "TransactionHandle",
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


# The server run, as text the same in every session (no time zone or date style in it).
_RUN = "extract(epoch FROM pg_postmaster_start_time())::text"
#: The name of the session's top-level transaction, ``<id>@<server run>`` (a SQL expression
#: for qx's INSERTs to return; see :class:`TransactionHandle`).
TRANSACTION_NAME_SQL = f"pg_current_xact_id()::text || '@' || {_RUN}"
_NAME_IF_ASSIGNED = f"SELECT pg_current_xact_id_if_assigned()::text || '@' || {_RUN}"
# One question: what became of the id here (or that this server has not reached it yet),
# which run answers, and whether it is a standby (whose history may still grow).
_STATUS = text(
    "SELECT CASE WHEN CAST(:xid AS xid8) >= pg_snapshot_xmax(pg_current_snapshot()) "
    f"THEN 'not reached' ELSE pg_xact_status(CAST(:xid AS xid8)) END, {_RUN}, "
    "pg_is_in_recovery()"
)
_TAKE_ID = text("SELECT pg_current_xact_id()")


class Backend(NamedTuple):
    """The server session behind a connection: what a probe needs to end it.

    Attributes:
        pid: the backend's process id.
        started: when it started (Unix seconds, as text: a process id is reused).
        server: the server run (see :class:`TransactionHandle`).
    """

    pid: int
    started: str
    server: str


#: Where the PostgreSQL strategy keeps a connection's :class:`Backend`, in the pool
#: record's ``info`` (SQLAlchemy's per-connection dict for extensions), read at connect.
BACKEND_KEY: Final = "qx.backend"
#: What :data:`BACKEND_KEY` holds, read in one round trip when a connection is made.
BACKEND_SQL: Final = (
    f"SELECT pid, extract(epoch FROM backend_start)::text, {_RUN} "
    "FROM pg_stat_activity WHERE pid = pg_backend_pid()"
)


class TransactionHandle(NamedTuple):
    """A transaction named so that a server can be asked about it after its COMMIT was lost.

    Attributes:
        transaction: the database's id of the transaction (what an operator asks about).
        server: the run of the server that gave the id (an id is reused across runs).
    """

    transaction: str
    server: str

    @classmethod
    def parse(cls, name: str) -> TransactionHandle:
        """Read ``<id>@<server run>`` (as :data:`TRANSACTION_NAME_SQL` returns it)."""
        transaction, _, server = name.partition("@")
        return cls(transaction, server)

    def __str__(self) -> str:
        return f"transaction {self.transaction}"


class RowHandle(NamedTuple):
    """A transaction of one statement, sent without BEGIN: named by a row it writes whose
    key was made for it, and by the backend that ran it.

    Attributes:
        column: a unique column of the row's table.
        value: the row's value there, made for this statement.
        backend: the server session that ran the statement.
    """

    column: Column[Any]
    value: Any
    backend: Backend

    def found(self) -> Select[Any]:
        """``SELECT 1`` of the row (built only when asked: most answers are not lost)."""
        return select(literal(1)).select_from(self.column.table).where(self.column == self.value)

    def __str__(self) -> str:
        row = f"{self.column.table.name}({self.column.key}={str(self.value)[:80]})"
        return f"the one-statement transaction writing {row}"


#: The handle of a transaction nobody can be asked about (an SQLite file's).
LOCAL_HANDLE: Final = TransactionHandle("", "")


class CommitProbe(Protocol):
    """How a backend tells what became of a transaction whose COMMIT answer was lost."""

    def ambiguous(self, error: BaseException) -> bool:
        """Whether a COMMIT that failed with ``error`` may have committed all the same."""

    def lone_handle(
        self, connection: Connection, column: Column[Any], value: Any
    ) -> RowHandle | None:
        """A handle on a transaction about to be sent as one statement without BEGIN on
        ``connection``, that writes a row whose unique ``column`` is ``value`` (made for
        this statement). ``None``: the backend cannot tell such a transaction's fate, and
        it is sent in a transaction of its own."""

    def handle(self, session: Session) -> TransactionHandle | None:
        """A handle on the session's transaction, taken just before COMMIT (``None``:
        nothing to find out). A backend that needs the transaction's writes done first
        flushes the session itself.

        Synchronous, on the session of the unit of work's ``AsyncSession``: the unit of work
        takes the handle and commits in one trip into the session's greenlet."""

    async def outcome(
        self,
        engine: AsyncEngine,
        handle: TransactionHandle | RowHandle,
        *,
        session: AsyncSession,
        deadline: float,
    ) -> bool | None:
        """``True`` committed, ``False`` not, ``None`` not known by ``deadline``
        (``time.monotonic()``). ``session`` is the one whose COMMIT failed (a backend whose
        failed transaction still holds locks there releases them first)."""


class _Verdict(enum.Enum):
    COMMITTED = True
    NOT_COMMITTED = False
    UNKNOWABLE = None
    ASK_AGAIN = "ask again"


def _verdict(handle: TransactionHandle, status: str | None, server: str) -> _Verdict:
    """What one answer from a primary says of ``handle``'s transaction."""
    if server == handle.server:  # the run that gave the id: its answer is about ours
        if status == "committed":
            return _Verdict.COMMITTED
        if status == "aborted":
            return _Verdict.NOT_COMMITTED
        if status is None:  # too old for the server to remember: cannot happen in time
            return _Verdict.UNKNOWABLE
        return _Verdict.ASK_AGAIN  # in progress: the server has not yet seen the client go
    # Another run (a restart, a promoted standby): the id may have been given again. An
    # answer that rules ours out holds whoever has the id now: not reached (our
    # transaction is not in this history), aborted (ours or the new one: neither
    # committed ours here), running (ours died with its run). "Committed" may be the
    # other transaction's: cannot be known.
    if status in ("not reached", "aborted", "in progress"):
        return _Verdict.NOT_COMMITTED
    return _Verdict.UNKNOWABLE


class PostgresProbe:
    """PostgreSQL's: the transaction's id and server run, then ``pg_xact_status``."""

    def ambiguous(self, error: BaseException) -> bool:
        # An error the server answered with means it did not commit; a connection that
        # failed may have carried the COMMIT and lost only its answer.
        return lost_connection(error)

    def handle(self, session: Session) -> TransactionHandle | None:
        name = _transaction_name(session)
        return None if name is None else TransactionHandle.parse(name)

    def lone_handle(
        self, connection: Connection, column: Column[Any], value: Any
    ) -> RowHandle | None:
        backend = connection.connection.info.get(BACKEND_KEY)
        if not isinstance(backend, Backend):
            return None  # a connection made elsewhere: its backend is not known
        return RowHandle(column, value, backend)

    async def outcome(
        self,
        engine: AsyncEngine,
        handle: TransactionHandle | RowHandle,
        *,
        session: AsyncSession,
        deadline: float,
    ) -> bool | None:
        # The session's connection is left alone: it failed, and a ROLLBACK sent on a
        # connection that went silent would wait for nothing.
        pause = 0.05
        while True:
            verdict = _Verdict.ASK_AGAIN
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    async with engine.connect() as conn, conn.begin():
                        if isinstance(handle, RowHandle):
                            verdict = await _row_verdict(conn, handle)
                        else:
                            answer = (
                                await conn.execute(_STATUS, {"xid": int(handle.transaction)})
                            ).one()
                            status, server, standby = answer
                            if not standby:  # a standby's history may still grow: ask again
                                verdict = _verdict(handle, status, server)
                        if verdict is _Verdict.COMMITTED:
                            # A primary shows its own commits as committed before its
                            # synchronous standbys have them (and a client was told). This
                            # transaction takes an id, so its COMMIT writes a record and waits
                            # for those standbys like any other: once it returns, ours (an
                            # earlier record) is replicated as the server's policy asks, and
                            # survives a failover to them.
                            await conn.execute(_TAKE_ID)
            except Exception as exc:  # the server may be away a little longer
                logger.info("asking about %s failed (%s)", handle, exc)
                verdict = _Verdict.ASK_AGAIN
            if verdict is not _Verdict.ASK_AGAIN:
                return verdict.value  # type: ignore[no-any-return]
            if time.monotonic() + pause >= deadline:
                return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


# Ends the backend that ran a one-statement transaction if it is still there: a row back
# means it was (and may still be finishing: ask again until it is gone).
_END_BACKEND = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE pid = :pid AND extract(epoch FROM backend_start)::text = :started"
)
_SERVER = text(f"SELECT {_RUN}, pg_is_in_recovery()")


async def _row_verdict(conn: AsyncConnection, handle: RowHandle) -> _Verdict:
    """What one primary says of a one-statement transaction: once the backend that ran it
    is gone, whether its row is there."""
    server, standby = (await conn.execute(_SERVER)).one()
    if standby:
        return _Verdict.ASK_AGAIN  # its history may still grow
    backend = handle.backend
    if server == backend.server:
        ended = await conn.execute(_END_BACKEND, {"pid": backend.pid, "started": backend.started})
        if ended.first() is not None:
            return _Verdict.ASK_AGAIN  # ended now, or on its way out: ask once it is gone
    # Gone (or gone with its server run): its statement committed or never will.
    found = (await conn.execute(handle.found())).first()
    return _Verdict.COMMITTED if found is not None else _Verdict.NOT_COMMITTED


def _transaction_name(session: Session) -> str | None:
    # The flush's writes give the transaction its id: ask after them, on the driver's own
    # connection (no SQLAlchemy statement: nothing for the session's hooks to scope).
    session.flush()
    record = existing_transaction(session)
    if record is not None and not record.connected:
        return None  # no statement ran: nothing to lose, and no connection to take for it
    if record is not None and record.transaction_id is not None:
        return record.transaction_id  # a qx write brought it back (qx.db._writes)
    found = fetch_row(session, _NAME_IF_ASSIGNED)[0]
    return None if found is None else str(found)


#: SQLSTATEs (SQLite's codes mapped, qx.db._translate) of a COMMIT that did not happen: busy
#: or locked (the transaction stays open, and is rolled back), a deferred constraint, an
#: interrupt, a snapshot that went stale.
UNDONE: Final = ("55P03", "40001", "57014", "23")
