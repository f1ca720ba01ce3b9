"""A connection that dies inside COMMIT (PostgreSQL, through a TCP proxy).

The proxy forwards the bus command's COMMIT to the server and loses the answer: the server
committed, the client only saw its connection die. A retry would deposit twice. qx asks a
fresh connection what became of the transaction: committed, so ``execute`` returns the
committed result and the handler ran once. When COMMIT itself is lost the transaction did
not commit, and the bus retries it safely. When nobody can be asked, ``execute`` raises
``CommitOutcomeUnknown`` and does not retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.cqrs import Command, MessageBus
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.errors import CommitOutcomeUnknown
from qx.settings import DatabaseSettings
from tests import models
from tests.integration.proxy import Proxy
from tests.integration.test_relay_crash import current_schema


@pytest.fixture
def backend() -> str:
    return "postgresql"


@dataclass(frozen=True, kw_only=True)
class Deposit(Command[int]):
    counter_id: UUID
    # How the transaction is written, and so where the commit probe gets the transaction's
    # id: "update" (qx's own UPDATE of the changed root returns it), "expression" (a SQL
    # expression assigned to the root: the flush writes it, and the probe asks), "outbox"
    # (an integration event: the outbox INSERT returns it), "insert" (a new aggregate by
    # the insert fast path).
    kind: str = "update"


@dataclass
class Ledger:
    proxy: Proxy
    bus: MessageBus
    factory: UnitOfWorkFactory[models.AppUnitOfWork]
    engine: AsyncEngine
    runs: list[UUID]


@pytest.fixture
async def ledger(engine: AsyncEngine) -> AsyncIterator[Ledger]:
    url = make_url(str(engine.url))
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = create_engine(
        DatabaseSettings(
            url=url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            search_path=await current_schema(engine),
        )
    )
    bus = MessageBus()
    runs: list[UUID] = []
    factory = UnitOfWorkFactory(
        models.AppUnitOfWork,
        create_session_factory(proxied),
        dispatcher=bus,
        commit_probe_timeout=2.0,
    )
    bus.provide(uow_factory=factory)

    @bus.handler(Deposit)
    async def deposit(command: Deposit, uow: models.AppUnitOfWork) -> int:
        runs.append(command.counter_id)
        if command.kind == "insert":
            await uow.counters.add(models.Counter(name=f"deposit {command.counter_id}"))
            return 1
        counter = await uow.counters.require(command.counter_id)
        if command.kind == "expression":  # an increment the database evaluates
            counter.value = models.counters.c.value + 1  # type: ignore[assignment]
            await uow.session.flush()
            return int(
                await uow.session.scalar(
                    select(models.counters.c.value).where(models.counters.c.id == counter.id)
                )
            )
        counter.increment(integration=command.kind == "outbox")
        return counter.value

    try:
        yield Ledger(proxy, bus, factory, proxied, runs)
    finally:
        await proxied.dispose()
        await proxy.stop()


async def balance(engine: AsyncEngine, ident: UUID, kind: str = "update") -> int:
    """The deposits applied: the counter's value, or the counters an insert made."""
    async with engine.connect() as conn:
        if kind == "insert":
            named = models.counters.c.name == f"deposit {ident}"
            return int(await conn.scalar(select(func.count()).where(named)))
        return int(
            await conn.scalar(select(models.counters.c.value).where(models.counters.c.id == ident))
        )


async def opened(ledger: Ledger) -> UUID:
    async with ledger.factory() as uow:
        counter = models.Counter(name="deposits")
        await uow.counters.add(counter)
        await uow.commit()
    return counter.id


KINDS = pytest.mark.parametrize("kind", ["update", "expression", "outbox", "insert"])


@pytest.mark.timeout(60)
@KINDS
async def test_a_commit_whose_answer_is_lost_is_found_committed_and_not_run_again(
    engine: AsyncEngine, ledger: Ledger, kind: str
) -> None:
    ident = await opened(ledger)
    ledger.proxy.cut_at(b"COMMIT")
    assert await ledger.bus.execute(Deposit(counter_id=ident, kind=kind)) == 1
    assert ledger.proxy.cuts == 1
    assert ledger.runs == [ident]  # once: the bus did not retry a committed deposit
    assert await balance(engine, ident, kind) == 1
    if kind == "insert":
        return
    # The factory goes on working over fresh connections.
    assert await ledger.bus.execute(Deposit(counter_id=ident)) == 2
    assert await balance(engine, ident) == 2


@pytest.mark.timeout(60)
async def test_a_commit_lost_on_its_way_did_not_happen_and_is_retried(
    engine: AsyncEngine, ledger: Ledger
) -> None:
    ident = await opened(ledger)
    ledger.proxy.cut_at(b"COMMIT", deliver=False)
    assert await ledger.bus.execute(Deposit(counter_id=ident)) == 1
    assert ledger.proxy.cuts == 1
    assert ledger.runs == [ident, ident]  # the first try did not commit: retried, once
    assert await balance(engine, ident) == 1


@pytest.mark.timeout(60)
@KINDS
async def test_a_commit_nobody_can_be_asked_about_is_unknown_and_never_retried(
    engine: AsyncEngine, ledger: Ledger, kind: str
) -> None:
    ident = await opened(ledger)
    ledger.proxy.cut_at(b"COMMIT", refuse=True)
    with pytest.raises(CommitOutcomeUnknown, match="not known after 2s") as caught:
        await ledger.bus.execute(Deposit(counter_id=ident, kind=kind))
    assert caught.value.transaction is not None and caught.value.transaction.isdigit()
    assert ledger.runs == [ident]  # never retried
    assert await balance(engine, ident, kind) == 1  # it had committed
    # The operator can still ask the server later.
    async with engine.connect() as conn:
        status = await conn.scalar(
            text("SELECT pg_xact_status(CAST(CAST(:xid AS text) AS xid8))"),
            {"xid": caught.value.transaction},
        )
    assert status == "committed"
