"""A cancellation that arrives while COMMIT is on its way, on every backend.

Cancelling a task does not stop a COMMIT already sent: the server (or SQLite's worker
thread) goes on and commits. The caller must then not be told the work did not happen: its
events would go back on the aggregates and a retry would apply it twice. qx lets COMMIT
finish, does the bookkeeping of a commit (state, after-commit hooks, the idempotency key's
stored result), then lets the cancellation go on.

The cancellation is delivered exactly while COMMIT is in flight: a listener on the engine's
``commit`` event (which runs just before the driver's COMMIT) cancels the caller's task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.cqrs import Command, MessageBus
from qx.db import UnitOfWorkFactory
from qx.outbox import outbox_table
from tests import models

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


@dataclass(frozen=True, kw_only=True)
class Deposit(Command[int]):
    counter_id: UUID


@contextmanager
def cancelled_in_commit(engine: AsyncEngine) -> Iterator[list[int]]:
    """Cancel the test's task while the COMMIT of the next transaction that updates a
    counter runs (not the bus's own transactions, such as an idempotency key's claim)."""
    caller = asyncio.current_task()
    assert caller is not None
    fired: list[int] = []
    armed: set[int] = set()

    def watch(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE COUNTERS"):
            armed.add(id(conn))

    def cancel(conn: Any) -> None:
        if id(conn) in armed and not fired:
            fired.append(1)
            caller.cancel()

    event.listen(engine.sync_engine, "before_cursor_execute", watch)
    event.listen(engine.sync_engine, "commit", cancel)
    try:
        yield fired
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", watch)
        event.remove(engine.sync_engine, "commit", cancel)
        caller.uncancel()  # the test caught it: later awaits run normally


async def balance(engine: AsyncEngine, ident: UUID) -> int:
    async with engine.connect() as conn:
        found = await conn.scalar(
            select(models.counters.c.value).where(models.counters.c.id == ident)
        )
    return int(found)


async def outbox_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(outbox_table)) or 0)


async def opened(factory: Factory) -> UUID:
    async with factory() as uow:
        counter = models.Counter(name="savings")
        await uow.counters.add(counter)
        await uow.commit()
    return counter.id


async def test_a_commit_cancelled_on_its_way_stands_and_its_bookkeeping_is_done(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    ident = await opened(uow_factory)
    hooks: list[str] = []
    with cancelled_in_commit(engine) as fired, pytest.raises(asyncio.CancelledError):
        async with uow_factory() as uow:
            counter = await uow.counters.require(ident)
            counter.increment(integration=True)
            uow.on_commit(lambda: hooks.append("ran"))
            await uow.commit()
    assert fired == [1]
    assert hooks == ["ran"]
    assert counter.collect_events() == []  # not put back for a retry to record again
    assert await balance(engine, ident) == 1
    assert await outbox_rows(engine) == 1


async def test_a_command_cancelled_in_its_commit_ran_once_and_its_key_answers_a_repeat(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    ident = await opened(uow_factory)
    runs: list[UUID] = []
    bus = MessageBus()
    bus.provide(uow_factory=uow_factory)

    @bus.handler(Deposit)
    async def deposit(command: Deposit, uow: models.AppUnitOfWork) -> int:
        runs.append(command.counter_id)
        counter = await uow.counters.require(command.counter_id)
        counter.increment()
        return counter.value

    command = Deposit(counter_id=ident, idempotency_key="deposit-1")
    with cancelled_in_commit(engine) as fired, pytest.raises(asyncio.CancelledError):
        await bus.execute(command)
    assert fired == [1]
    assert runs == [ident]
    assert await balance(engine, ident) == 1
    # The caller does not know the outcome; repeating with the key is safe: the stored result.
    assert await bus.execute(command) == 1
    assert runs == [ident]
    assert await balance(engine, ident) == 1
