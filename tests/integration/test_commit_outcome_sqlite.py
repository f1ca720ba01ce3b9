"""A COMMIT that fails on an SQLite file (issue 22): what the bus may retry.

SQLite commits in the process, so no answer is lost on a wire; what can go wrong is SQLite's
own COMMIT failing. Some failures leave the transaction undone (busy or locked: the
transaction stays open and is rolled back; a deferred constraint): retrying is safe. Others
can come after the commit record reached the write-ahead log (an I/O error syncing it), and
SQLite does not say which happened. The transaction wrote its commit marker; a fresh
connection writes the same key: taken, the command committed and ``execute`` returns its
result; written, it did not (and now never can) and the bus retries it; neither in time,
``CommitOutcomeUnknown``, never retried.

The faults are injected into the driver's COMMIT of the connections the unit of work uses:
a busy database refuses it, or the COMMIT is reported failed after it was done, or before.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.cqrs import MessageBus
from qx.db import UnitOfWorkFactory, create_session_factory
from qx.errors import CommitOutcomeUnknown
from tests import models
from tests.integration.test_commit_outcome import Deposit, balance, opened


@pytest.fixture
def backend() -> str:
    return "sqlite"


@dataclass
class Ledger:
    bus: MessageBus
    factory: UnitOfWorkFactory[models.AppUnitOfWork]
    runs: list[UUID]


@pytest.fixture
async def ledger(engine: AsyncEngine) -> Ledger:
    bus = MessageBus()
    runs: list[UUID] = []
    factory = UnitOfWorkFactory(
        models.AppUnitOfWork,
        create_session_factory(engine),
        dispatcher=bus,
        commit_probe_timeout=1.0,
    )
    bus.provide(uow_factory=factory)

    @bus.handler(Deposit)
    async def deposit(command: Deposit, uow: models.AppUnitOfWork) -> int:
        runs.append(command.counter_id)
        counter = await uow.counters.require(command.counter_id)
        counter.increment(integration=True)
        return counter.value

    return Ledger(bus, factory, runs)


def sqlite_error(name: str, code: int, message: str) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorname = name
    error.sqlite_errorcode = code
    return error


@contextmanager
def failing_commit(engine: AsyncEngine, *, commit_first: bool, error: Exception) -> Iterator[None]:
    """The next COMMIT on a connection of ``engine`` fails with ``error`` (after committing,
    with ``commit_first``)."""
    armed = [True]

    def on_commit(conn: Any) -> None:
        if not armed[0]:
            return
        armed[0] = False
        driver = conn.connection.dbapi_connection._connection  # aiosqlite's connection
        original = driver.commit

        async def commit() -> None:
            driver.commit = original
            if commit_first:
                await original()
            raise error

        driver.commit = commit

    event.listen(engine.sync_engine, "commit", on_commit)
    try:
        yield
    finally:
        event.remove(engine.sync_engine, "commit", on_commit)


async def test_a_busy_database_refuses_commit_and_the_command_is_retried_once(
    engine: AsyncEngine, ledger: Ledger
) -> None:
    ident = await opened(ledger)
    busy = sqlite_error("SQLITE_BUSY", 5, "database is locked")
    with failing_commit(engine, commit_first=False, error=busy):
        assert await ledger.bus.execute(Deposit(counter_id=ident)) == 1
    assert ledger.runs == [ident, ident]  # not committed: retried, once
    assert await balance(engine, ident) == 1


async def test_a_commit_reported_failed_after_it_happened_returns_its_result(
    engine: AsyncEngine, ledger: Ledger
) -> None:
    ident = await opened(ledger)
    fsync = sqlite_error("SQLITE_IOERR_FSYNC", 1034, "disk I/O error")
    with failing_commit(engine, commit_first=True, error=fsync):
        # The marker is there: the commit happened, and the command's result comes back.
        assert await ledger.bus.execute(Deposit(counter_id=ident)) == 1
    assert ledger.runs == [ident]  # never run again
    assert await balance(engine, ident) == 1  # applied exactly once
    assert await ledger.bus.execute(Deposit(counter_id=ident)) == 2  # and the factory goes on


async def test_a_commit_reported_failed_before_it_happened_is_fenced_and_retried(
    engine: AsyncEngine, ledger: Ledger
) -> None:
    ident = await opened(ledger)
    fsync = sqlite_error("SQLITE_IOERR_FSYNC", 1034, "disk I/O error")
    with failing_commit(engine, commit_first=False, error=fsync):
        assert await ledger.bus.execute(Deposit(counter_id=ident)) == 1
    assert ledger.runs == [ident, ident]  # fenced, so the retry was safe: run again, once
    assert await balance(engine, ident) == 1
    async with engine.connect() as conn:  # the fence holds the first try's key
        markers = await conn.scalar(text("SELECT count(*) FROM qx_commit"))
    assert markers is not None and markers >= 3  # the opening, the fence, the retry


async def test_a_commit_that_cannot_be_resolved_is_unknown_and_never_retried(
    engine: AsyncEngine, ledger: Ledger
) -> None:
    ident = await opened(ledger)
    fsync = sqlite_error("SQLITE_IOERR_FSYNC", 1034, "disk I/O error")
    with (
        failing_commit(engine, commit_first=True, error=fsync),
        unreachable_after_first_commit(engine),
        pytest.raises(CommitOutcomeUnknown, match="SQLITE_IOERR_FSYNC") as caught,
    ):
        await ledger.bus.execute(Deposit(counter_id=ident))
    assert ledger.runs == [ident]  # never retried
    assert await balance(engine, ident) == 1  # it had committed: applied exactly once
    assert len(str(caught.value)) < 500
    assert await ledger.bus.execute(Deposit(counter_id=ident)) == 2


@contextmanager
def unreachable_after_first_commit(engine: AsyncEngine) -> Iterator[None]:
    """Once a COMMIT was attempted, no new transaction can begin on ``engine`` (the file
    failing for the marker's check too)."""
    committed = [False]

    def on_commit(_conn: Any) -> None:
        committed[0] = True

    def on_begin(_conn: Any) -> None:
        if committed[0]:
            raise sqlite_error("SQLITE_IOERR_READ", 266, "disk I/O error")

    event.listen(engine.sync_engine, "commit", on_commit)
    event.listen(engine.sync_engine, "begin", on_begin)
    try:
        yield
    finally:
        event.remove(engine.sync_engine, "commit", on_commit)
        event.remove(engine.sync_engine, "begin", on_begin)
