"""qx's own writes, as an application sees them, on every backend.

qx sends the rows it writes itself (new aggregates, changed rows, commit stages' rows) to
the driver's cursor from statements it compiled once, not through ``Connection.execute``.
Whatever SQLAlchemy's execution gives an application must still hold: each value goes
through its column type's conversion, cursor event listeners see (and may rewrite) every
statement, echo logs it, the driver's errors come back as qx's typed errors with nothing
written, a stage's statement gets its Python-side column defaults and the values bound in
it, and a schema translation map sends the rows where it says. A small ledger of its own:
accounts owning entries, amounts as a value object stored as cents, and an audit stage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Table,
    TypeDecorator,
    Uuid,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, IntegrationEvent, new_id
from qx.db import (
    CommitContext,
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    audit_columns,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    uuid_pk,
    version_column,
)
from qx.db._writes import COMBINED_ROWS
from qx.errors import ConfigurationError, DuplicateKey, QxError
from qx.outbox import OutboxStage, outbox_table
from tests.integration.conftest import own_domain

ledger_metadata = make_metadata()
registry = make_registry(ledger_metadata)


@dataclass(frozen=True)
class Money:
    """An amount in cents; stored as an integer by :class:`Cents`."""

    cents: int


class Cents(TypeDecorator[Money]):
    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: Money | None, dialect: Dialect) -> int | None:
        return None if value is None else value.cents

    def process_result_value(self, value: int | None, dialect: Dialect) -> Money | None:
        return None if value is None else Money(value)


@dataclass(eq=False, kw_only=True)
class Entry:
    id: UUID = field(default_factory=new_id)
    memo: str
    amount: Money


@dataclass(eq=False, kw_only=True)
class Account(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    balance: Money
    entries: list[Entry] = field(default_factory=list)
    version: int = 1
    created_at: datetime | None = None
    updated_at: datetime | None = None


accounts = Table(
    "wp_accounts",
    ledger_metadata,
    uuid_pk(),
    Column("name", String(40), nullable=False, unique=True),
    Column("balance", Cents(), nullable=False),
    version_column(),
    *audit_columns(),
)
entries = Table(
    "wp_entries",
    ledger_metadata,
    uuid_pk(),
    Column("account_id", Uuid(), ForeignKey("wp_accounts.id"), nullable=False),
    Column("memo", String(40), nullable=False),
    Column("amount", Cents(), nullable=False),
)
audit = Table(
    "wp_audit",
    ledger_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("n", Integer, nullable=False),
    Column("kind", String(20), nullable=False, default="auto"),
    Column("at", DateTime(timezone=True), nullable=True, default=lambda: datetime(2026, 1, 2)),
)
map_entity(registry, Entry, entries)
map_aggregate(
    registry,
    Account,
    accounts,
    properties={"entries": relationship(Entry, cascade="all, delete-orphan")},
)


class Accounts(Repository[Account]):
    pass


class LedgerUnitOfWork(UnitOfWork):
    accounts: Accounts


class AuditStage:
    """Writes three audit rows per commit: one leaving ``kind`` and ``at`` to their
    Python-side defaults, none from an empty list, two with ``kind`` bound in the
    statement itself."""

    name = "audit"
    accepts = ()

    async def before_commit(self, commit: CommitContext) -> int:
        await commit.insert(insert(audit), [{"n": 1}])
        await commit.insert(insert(audit), [])  # no rows: nothing sent, not a row of defaults
        given = datetime(2026, 1, 3)
        await commit.insert(
            insert(audit).values(kind="fixed"), [{"n": 2, "at": given}, {"n": 3, "at": given}]
        )
        return 3

    async def after_commit(self, commit: CommitContext, written: int) -> None:
        pass


Domain = tuple[UnitOfWorkFactory[LedgerUnitOfWork], AsyncEngine]


@pytest.fixture
async def domain(backend: str, tmp_path: Any) -> AsyncIterator[Domain]:
    async with own_domain(backend, tmp_path, LedgerUnitOfWork, ledger_metadata) as made:
        yield made


@pytest.fixture
async def audited(backend: str, tmp_path: Any) -> AsyncIterator[Domain]:
    async with own_domain(
        backend,
        tmp_path,
        LedgerUnitOfWork,
        ledger_metadata,
        stages=[OutboxStage(), AuditStage()],
    ) as made:
        yield made


def _account(name: str = "cash") -> Account:
    return Account(
        name=name,
        balance=Money(1050),
        entries=[Entry(memo=f"e{k}", amount=Money(100 * k + 7)) for k in range(3)],
    )


async def _rows(engine: AsyncEngine, statement: Any) -> Sequence[Any]:
    async with engine.connect() as conn:
        return (await conn.execute(statement)).all()


async def test_values_go_through_their_column_types(domain: Domain) -> None:
    factory, engine = domain
    account = _account()
    async with factory() as uow:
        await uow.accounts.add(account)
        await uow.commit()
    # Stored as the type converts them: plain integers (read without the TypeDecorator).
    raw = text("SELECT balance FROM wp_accounts")
    assert [row[0] for row in await _rows(engine, raw)] == [1050]
    raw_entries = text("SELECT memo, amount FROM wp_entries ORDER BY memo")
    assert [tuple(row) for row in await _rows(engine, raw_entries)] == [
        ("e0", 7),
        ("e1", 107),
        ("e2", 207),
    ]
    async with factory() as uow:
        loaded = await uow.accounts.require(account.id)
        loaded.balance = Money(2000)
        loaded.entries[0].amount = Money(1)
        await uow.commit()
    assert [row[0] for row in await _rows(engine, raw)] == [2000]
    assert sorted(row[1] for row in await _rows(engine, raw_entries)) == [1, 107, 207]
    async with factory() as uow:
        again = await uow.accounts.require(account.id)
        assert again.balance == Money(2000)
        assert sorted(entry.amount.cents for entry in again.entries) == [1, 107, 207]
        assert again.version == 2


def _inserts(statements: Sequence[str]) -> list[list[str]]:
    """Per statement that writes this ledger's tables, the tables it inserts into, in order."""
    found = [re.findall(r"INSERT INTO (wp_\w+)", sql) for sql in statements]
    return [tables for tables in found if tables]


async def test_cursor_listeners_see_and_may_rewrite_every_write(
    backend: str, domain: Domain
) -> None:
    factory, engine = domain
    before: list[tuple[str, bool]] = []
    after: list[tuple[str, bool]] = []

    def tag(
        _conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool
    ) -> tuple[str, Any]:
        # As SQL commenters do: the statement the driver gets is the listener's.
        tagged = f"/* ledger */ {statement}"
        before.append((tagged, many))
        return tagged, params

    def saw(_conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, many: bool) -> None:
        after.append((statement, many))

    event.listen(engine.sync_engine, "before_cursor_execute", tag, retval=True)
    event.listen(engine.sync_engine, "after_cursor_execute", saw)
    try:
        account = _account()
        async with factory() as uow:
            await uow.accounts.add(account)
            await uow.commit()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", tag)
        event.remove(engine.sync_engine, "after_cursor_execute", saw)
    writes = [(sql, many) for sql, many in before if "INSERT INTO wp_" in sql]
    assert all(sql.startswith("/* ledger */ ") for sql, _ in writes)
    if backend == "postgresql":
        # One statement writes both tables (data-modifying WITH), parents first.
        assert _inserts([sql for sql, _ in writes]) == [["wp_accounts", "wp_entries"]]
        assert [many for _, many in writes] == [False]
    else:
        assert _inserts([sql for sql, _ in writes]) == [["wp_accounts"], ["wp_entries"]]
        assert [many for _, many in writes] == [False, True]  # three entries, one executemany
    assert after == before  # every statement the listener rewrote was sent as rewritten
    assert len(await _rows(engine, select(entries.c.id))) == 3


async def test_echo_logs_every_write(domain: Domain, caplog: pytest.LogCaptureFixture) -> None:
    factory, _ = domain
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine.Engine")
    async with factory() as uow:
        await uow.accounts.add(_account("echoed"))
        await uow.commit()
    messages = [record.getMessage() for record in caplog.records]
    assert [table for tables in _inserts(messages) for table in tables] == [
        "wp_accounts",
        "wp_entries",
    ]
    assert any("'echoed'" in m for m in messages)  # the parameters too
    assert "COMMIT" in messages


async def test_a_refused_write_is_named_and_leaves_nothing(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        await uow.accounts.add(_account("cash"))
        await uow.commit()
    twin = _account("cash")
    with pytest.raises(DuplicateKey):
        async with factory() as uow:
            await uow.accounts.add(twin)
            await uow.commit()
    assert len(await _rows(engine, select(accounts.c.id))) == 1
    assert len(await _rows(engine, select(entries.c.id))) == 3  # the first account's only
    # The same objects, renamed, go through afterwards: nothing was left half-written.
    twin.name = "bank"
    async with factory() as uow:
        await uow.accounts.add(twin)
        await uow.commit()
    assert len(await _rows(engine, select(entries.c.id))) == 6


async def test_stage_rows_get_python_defaults_and_bound_values(audited: Domain) -> None:
    factory, engine = audited
    async with factory() as uow:
        await uow.accounts.add(_account())
        await uow.commit()
    found = await _rows(engine, select(audit.c.n, audit.c.kind, audit.c.at).order_by(audit.c.n))
    assert [(n, kind) for n, kind, _ in found] == [(1, "auto"), (2, "fixed"), (3, "fixed")]
    assert [at.replace(tzinfo=None) for *_, at in found] == [
        datetime(2026, 1, 2),
        datetime(2026, 1, 3),
        datetime(2026, 1, 3),
    ]


async def test_a_schema_translation_map_is_honoured(backend: str, domain: Domain) -> None:
    if backend != "postgresql":
        pytest.skip("schemas are PostgreSQL's; SQLite's attached databases are not set up here")
    _, engine = domain
    other = f"wp_{new_id().hex[:12]}"
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{other}"'))
        await conn.run_sync(
            lambda sync: ledger_metadata.create_all(
                sync.execution_options(schema_translate_map={None: other})
            )
        )
    try:
        translated = engine.execution_options(schema_translate_map={None: other})
        factory = UnitOfWorkFactory(LedgerUnitOfWork, create_session_factory(translated))
        async with factory() as uow:
            account = _account()
            await uow.accounts.add(account)
            await uow.commit()
        async with factory() as uow:
            loaded = await uow.accounts.require(account.id)
            loaded.balance = Money(5)
            await uow.commit()
        moved = text(f'SELECT balance, version FROM "{other}".wp_accounts')
        assert [tuple(row) for row in await _rows(engine, moved)] == [(5, 2)]
        assert await _rows(engine, select(accounts.c.id)) == []  # nothing in the default schema
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{other}" CASCADE'))


@dataclass(frozen=True, kw_only=True)
class AccountOpened(IntegrationEvent):
    name = "ledger.account_opened"
    version = 1
    account_id: UUID


class CountingStage:
    """Reads, through the commit's connection, the entries the commit wrote, and records how
    many it saw in the audit table."""

    name = "counting"
    accepts = ()

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def before_commit(self, commit: CommitContext) -> int:
        conn = await commit.connection()
        self.seen.append(
            (await conn.execute(select(func.count()).select_from(entries))).scalar_one()
        )
        await commit.insert(insert(audit), [{"n": self.seen[-1], "kind": "count"}])
        return 1

    async def after_commit(self, commit: CommitContext, written: int) -> None:
        pass


async def test_a_stage_reads_the_rows_the_commit_writes(backend: str, tmp_path: Any) -> None:
    counting = CountingStage()
    async with own_domain(
        backend, tmp_path, LedgerUnitOfWork, ledger_metadata, stages=[counting, OutboxStage()]
    ) as (factory, engine):
        async with factory() as uow:
            account = _account()
            await uow.accounts.add(account)
            uow.emit(AccountOpened(account_id=account.id))
            await uow.commit()
        # The new account's rows are held back to go with the stages' rows; the first stage,
        # reading through the connection, gets them sent first.
        assert counting.seen == [3]
        assert [tuple(row) for row in await _rows(engine, select(audit.c.n, audit.c.kind))] == [
            (3, "count")
        ]
        assert len(await _rows(engine, select(outbox_table.c.id))) == 1


async def test_many_parts_go_in_a_statement_of_their_own(backend: str, domain: Domain) -> None:
    factory, engine = domain
    sent: list[tuple[str, bool]] = []

    def saw(_conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, many: bool) -> None:
        sent.append((statement, many))

    event.listen(engine.sync_engine, "after_cursor_execute", saw)
    try:
        for count in (COMBINED_ROWS, COMBINED_ROWS + 1):
            sent.clear()
            account = Account(
                name=f"n{count}",
                balance=Money(count),
                entries=[Entry(memo=f"e{k}", amount=Money(k)) for k in range(count)],
            )
            async with factory() as uow:
                await uow.accounts.add(account)
                await uow.commit()
            written = _inserts([sql for sql, _ in sent])
            if backend == "postgresql" and count == COMBINED_ROWS:
                assert written == [["wp_accounts", "wp_entries"]]
            else:
                # A long list of rows goes as an executemany: one shape of statement for
                # any number of rows.
                assert written == [["wp_accounts"], ["wp_entries"]]
                assert [many for sql, many in sent if "wp_entries" in sql] == [True]
            async with factory() as uow:
                loaded = await uow.accounts.require(account.id)
                assert sorted(entry.amount.cents for entry in loaded.entries) == list(range(count))
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", saw)


async def test_a_refused_part_leaves_nothing_of_its_aggregate(domain: Domain) -> None:
    factory, engine = domain
    first = _account("cash")
    async with factory() as uow:
        await uow.accounts.add(first)
        await uow.commit()
    # The last rows of the commit fail: an entry whose key is taken.
    clash = _account("bank")
    clash.entries[-1].id = first.entries[0].id
    with pytest.raises(DuplicateKey):
        async with factory() as uow:
            await uow.accounts.add(clash)
            uow.emit(AccountOpened(account_id=clash.id))
            await uow.commit()
    assert [row[0] for row in await _rows(engine, select(accounts.c.name))] == ["cash"]
    assert len(await _rows(engine, select(entries.c.id))) == 3
    assert await _rows(engine, select(outbox_table.c.id)) == []
    clash.entries[-1].id = new_id()
    async with factory() as uow:
        await uow.accounts.add(clash)
        await uow.commit()
    assert len(await _rows(engine, select(entries.c.id))) == 6


@pytest.mark.skip_on("memory", reason="the testing kit makes its tables from the metadata")
async def test_a_missing_table_of_the_application_is_not_taken_for_the_outbox(
    domain: Domain,
) -> None:
    factory, engine = domain
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: entries.drop(sync))
    account = _account()
    with pytest.raises(QxError) as raised:
        async with factory() as uow:
            await uow.accounts.add(account)
            uow.emit(AccountOpened(account_id=account.id))
            await uow.commit()
    # Not "run qx's migrations": qx's tables are there, the application's are not.
    assert not isinstance(raised.value, ConfigurationError), raised.value
    assert await _rows(engine, select(accounts.c.id)) == []
    assert await _rows(engine, select(outbox_table.c.id)) == []
