"""The commit as a pipeline (issue 23): packages above the database layer add stages.

An application adds a stage of its own (an audit row per commit) beside qx's outbox: its
row commits with the aggregate and the outbox rows, or nothing does; its after-commit step
runs after COMMIT and only when it wrote; a stage that fails rolls the whole unit of work
back and leaves the aggregate's events on it for a retry. A factory without the outbox
refuses a commit that recorded integration events instead of dropping them. Each on
memory, SQLite and PostgreSQL, through the public API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, Integer, String, Table, func, insert, select

from qx.core import AggregateRoot, DomainEvent, IntegrationEvent, new_id
from qx.db import (
    CommitContext,
    CommitStage,
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    uuid_pk,
    version_column,
)
from qx.errors import ConfigurationError
from qx.outbox import OutboxStage, outbox_table
from qx.testing import InMemoryStore, InMemoryUnitOfWorkFactory
from tests.integration.conftest import drop_schema, engine_with_tables

stage_metadata = make_metadata()
registry = make_registry(stage_metadata)


@dataclass(frozen=True, kw_only=True)
class Opened(IntegrationEvent):
    name = "ledger.opened"
    ledger_id: UUID


@dataclass(frozen=True, kw_only=True)
class Noted(DomainEvent):
    text: str


@dataclass(eq=False, kw_only=True)
class Ledger(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    title: str
    version: int = 1

    @classmethod
    def open(cls, title: str) -> Ledger:
        ledger = cls(title=title)
        ledger.record(Opened(ledger_id=ledger.id))
        return ledger

    def note(self, text: str) -> None:
        self.record(Noted(text=text))


ledgers = Table(
    "stage_ledgers", stage_metadata, uuid_pk(), Column("title", String(40)), version_column()
)
audit = Table(
    "stage_audit",
    stage_metadata,
    Column("n", Integer(), primary_key=True, autoincrement=True),
    Column("events", Integer(), nullable=False),
    Column("correlation_id", String(64), nullable=False),
)
map_aggregate(registry, Ledger, ledgers)


class Ledgers(Repository[Ledger]):
    pass


class LedgerUnitOfWork(UnitOfWork):
    ledgers: Ledgers


class AuditStage:
    """One audit row per commit that settled events; remembers what ran after COMMIT."""

    name = "audit"
    accepts: tuple[type[Any], ...] = ()

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.after: list[tuple[int, int]] = []

    async def before_commit(self, commit: CommitContext) -> int:
        if not commit.records:
            return 0
        if self.fail:
            raise RuntimeError("audit store refused")
        conn = await commit.connection()
        await conn.execute(
            insert(audit),
            [{"events": len(commit.records), "correlation_id": commit.correlation_id}],
        )
        return 1

    async def after_commit(self, commit: CommitContext, written: int) -> None:
        self.after.append((len(commit.records), written))


@dataclass
class Setup:
    make: Any  # (stages) -> factory
    count: Any  # async (table) -> int


@pytest.fixture
async def setup(backend: str, tmp_path: Any) -> AsyncIterator[Setup]:
    if backend == "memory":
        async with InMemoryStore(stage_metadata) as store:

            async def count_memory(table: Table) -> int:
                async with store.engine.connect() as conn:
                    return int(
                        (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                    )

            yield Setup(
                make=lambda stages: InMemoryUnitOfWorkFactory(
                    LedgerUnitOfWork, store, stages=stages
                ),
                count=count_memory,
            )
        return
    engine, schema = await engine_with_tables(backend, tmp_path, stage_metadata)
    sessions = create_session_factory(engine)

    async def count(table: Table) -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())

    try:
        yield Setup(
            make=lambda stages: UnitOfWorkFactory(LedgerUnitOfWork, sessions, stages=stages),
            count=count,
        )
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_schema(schema)


def test_the_default_stages_are_the_installed_outbox() -> None:
    factory = UnitOfWorkFactory(LedgerUnitOfWork, create_session_factory(None))  # type: ignore[arg-type]
    assert [type(stage) for stage in factory.stages] == [OutboxStage]
    assert all(isinstance(stage, CommitStage) for stage in factory.stages)
    # One instance per factory: a stage may hold per-engine state (the relay wake-up).
    other = UnitOfWorkFactory(LedgerUnitOfWork, create_session_factory(None))  # type: ignore[arg-type]
    assert other.stages[0] is not factory.stages[0]


async def test_a_stage_commits_with_the_aggregate_and_the_outbox(setup: Setup) -> None:
    stage = AuditStage()
    factory = setup.make([OutboxStage(), stage])
    async with factory() as uow:
        ledger = Ledger.open("cash")
        ledger.note("first")
        await uow.ledgers.add(ledger)
        assert stage.after == []  # nothing after COMMIT before COMMIT
        await uow.commit()
    assert stage.after == [(2, 1)]
    assert await setup.count(ledgers) == 1
    assert await setup.count(outbox_table) == 1  # Opened; Noted is a domain event
    assert await setup.count(audit) == 1

    async with factory() as uow:  # a read: no events, so no audit row and no after step
        assert (await uow.ledgers.require(ledger.id)).title == "cash"
        await uow.commit()
    assert stage.after == [(2, 1)]
    assert await setup.count(audit) == 1


async def test_a_failing_stage_rolls_everything_back_and_a_retry_commits_once(
    setup: Setup,
) -> None:
    stage = AuditStage(fail=True)
    factory = setup.make([OutboxStage(), stage])
    ledger = Ledger.open("cash")
    async with factory() as uow:
        await uow.ledgers.add(ledger)
        with pytest.raises(RuntimeError, match="audit store refused"):
            await uow.commit()
    # The outbox stage ran before the failing one: its row went with the rollback.
    assert (await setup.count(ledgers), await setup.count(outbox_table)) == (0, 0)
    assert await setup.count(audit) == 0
    assert stage.after == []
    assert [type(event) for event in ledger.pending_events] == [Opened]  # given back

    stage.fail = False
    async with factory() as uow:  # the same object, retried as a service would
        await uow.ledgers.add(ledger)
        await uow.commit()
    counts = [await setup.count(table) for table in (ledgers, outbox_table, audit)]
    assert counts == [1, 1, 1]
    assert ledger.pending_events == ()


async def test_without_an_outbox_integration_events_are_refused_not_dropped(
    setup: Setup,
) -> None:
    factory = setup.make(())
    async with factory() as uow:
        ledger = Ledger.open("cash")
        await uow.ledgers.add(ledger)
        with pytest.raises(
            ConfigurationError, match=r"Opened is an integration event.*OutboxStage"
        ):
            await uow.commit()
    assert (await setup.count(ledgers), await setup.count(outbox_table)) == (0, 0)
    assert [type(event) for event in ledger.pending_events] == [Opened]

    # Domain events alone need no stage.
    async with factory() as uow:
        quiet = Ledger(title="quiet")
        quiet.note("local only")
        await uow.ledgers.add(quiet)
        await uow.commit()
    assert (await setup.count(ledgers), await setup.count(outbox_table)) == (1, 0)


def test_a_stage_that_is_not_one_is_refused_at_wiring_time() -> None:
    with pytest.raises(ConfigurationError, match="stages: 'audit' is not a CommitStage"):
        UnitOfWorkFactory(LedgerUnitOfWork, create_session_factory(None), stages=["audit"])  # type: ignore[arg-type, list-item]
