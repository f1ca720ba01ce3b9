"""The unit of work's guarantees, tried the way an application uses qx.

A small domain of its own (a warehouse: accounts without parts, products owning batches,
batches allocating order lines through a many-to-many set - the cosmicpython allocation
model), on SQLite and PostgreSQL. Each test asserts on what the database and the outbox
hold afterwards:

* events recorded on an aggregate nobody references any more still reach the handlers and
  the outbox (helpers that return early, streams, garbage collection);
* a failed commit leaves the aggregates retryable: the same objects commit in a fresh unit
  of work with their events, exactly once;
* every change inside an aggregate - a part's many-to-many collection included - bumps the
  root's version once per transaction;
* every statement run in a unit of work fails with a qx error, even a raw one in a handler;
* the in-memory SQLite default gives each unit of work its own transaction;
* loaded aggregates have their unmapped dataclass defaults; ``__post_init__`` is a choice.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    Uuid,
    func,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, DomainEvent, InProcessDispatcher, IntegrationEvent, new_id
from qx.cqrs import Command, MessageBus, RetryPolicy
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_engine,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    uuid_pk,
    version_column,
)
from qx.errors import (
    ConcurrencyConflict,
    ConfigurationError,
    DatabaseError,
    DuplicateKey,
    IntegrityViolation,
    InvalidQuery,
    StatementTimeout,
    UnitOfWorkError,
)
from qx.migrations import upgrade
from qx.settings import DatabaseSettings
from qx.testing import InMemoryStore
from tests.integration.conftest import engine_with_tables, make_backend_engine
from tests.integration.helpers import outbox_rows

# -- the domain ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Deposited(DomainEvent):
    account_id: UUID
    amount: int


@dataclass(frozen=True, kw_only=True)
class AccountAuditedV1(IntegrationEvent):
    name = "warehouse.account_audited"
    version = 1
    account_id: UUID
    note: str


@dataclass(frozen=True, kw_only=True)
class AllocatedV1(IntegrationEvent):
    name = "warehouse.allocated"
    version = 1
    product_id: UUID
    line_id: UUID


@dataclass(eq=False, kw_only=True)
class Account(AggregateRoot):
    """A root that owns no parts."""

    id: UUID = field(default_factory=new_id)
    name: str
    balance: int = 0
    referrer_id: UUID | None = None
    version: int | None = None

    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.record(Deposited(account_id=self.id, amount=amount))

    def audit(self, note: str) -> None:
        """Records an event and changes nothing."""
        self.record(AccountAuditedV1(account_id=self.id, note=note))


@dataclass(eq=False, kw_only=True)
class OrderLine:
    """What batches allocate (an entity of its own, not a part of Product)."""

    id: UUID = field(default_factory=new_id)
    sku: str
    qty: int


@dataclass(eq=False, kw_only=True)
class Batch:
    """A part of Product; its allocations are a many-to-many set."""

    id: UUID = field(default_factory=new_id)
    reference: str
    purchased: int
    allocations: set[OrderLine] = field(default_factory=set)

    @property
    def available(self) -> int:
        return self.purchased - sum(line.qty for line in self.allocations)


@dataclass(eq=False, kw_only=True)
class Product(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    sku: str
    batches: list[Batch] = field(default_factory=list)
    version: int | None = None

    def allocate(self, line: OrderLine) -> Batch:
        for batch in sorted(self.batches, key=lambda b: b.reference):
            if batch.available >= line.qty:
                batch.allocations.add(line)
                self.record(AllocatedV1(product_id=self.id, line_id=line.id))
                return batch
        raise ValueError(f"out of stock: {self.sku}")


metadata = make_metadata()
registry = make_registry(metadata)
accounts = Table(
    "g_accounts",
    metadata,
    uuid_pk(),
    Column("name", String(50), nullable=False, unique=True),
    Column("balance", Integer(), nullable=False),
    # Deferred: a missing referrer fails at COMMIT, not at the INSERT.
    Column(
        "referrer_id",
        Uuid(),
        ForeignKey("g_accounts.id", deferrable=True, initially="DEFERRED"),
        nullable=True,
    ),
    version_column(),
)
products = Table(
    "g_products", metadata, uuid_pk(), Column("sku", String(20), nullable=False), version_column()
)
batches = Table(
    "g_batches",
    metadata,
    uuid_pk(),
    Column("product_id", Uuid(), ForeignKey("g_products.id"), nullable=False),
    Column("reference", String(20), nullable=False),
    Column("purchased", Integer(), nullable=False),
)
lines = Table(
    "g_lines",
    metadata,
    uuid_pk(),
    Column("sku", String(20), nullable=False),
    Column("qty", Integer(), nullable=False),
)
allocations = Table(
    "g_allocations",
    metadata,
    Column("batch_id", Uuid(), ForeignKey("g_batches.id"), primary_key=True),
    Column("line_id", Uuid(), ForeignKey("g_lines.id"), primary_key=True),
)
map_aggregate(registry, Account, accounts)
map_entity(registry, OrderLine, lines)
map_entity(
    registry,
    Batch,
    batches,
    properties={
        "allocations": relationship(
            OrderLine, secondary=allocations, collection_class=set, lazy="selectin"
        )
    },
)
map_aggregate(
    registry,
    Product,
    products,
    properties={"batches": relationship(Batch, cascade="all, delete-orphan")},
)


@dataclass(frozen=True, kw_only=True)
class Deposit(Command[int]):
    account_id: UUID


class Accounts(Repository[Account]):
    filterable = frozenset({"name", "balance"})
    sortable = frozenset({"name"})


class Products(Repository[Product]):
    sortable = frozenset({"sku"})


class WarehouseUnitOfWork(UnitOfWork):
    accounts: Accounts
    products: Products


Factory = UnitOfWorkFactory[WarehouseUnitOfWork]


@pytest.fixture
async def warehouse(engine: AsyncEngine, store: InMemoryStore | None) -> AsyncEngine:
    if store is not None:
        store.include(metadata)  # the testing kit makes tables from the metadata
        return engine
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    return engine


@pytest.fixture
def handled() -> list[Any]:
    return []


@pytest.fixture
def wh_dispatcher(handled: list[Any]) -> InProcessDispatcher:
    dispatcher = InProcessDispatcher()

    @dispatcher.handler(Deposited)
    async def on_deposit(event: Deposited, uow: Any) -> None:
        handled.append(event)

    @dispatcher.handler(AccountAuditedV1)
    async def on_audit(event: AccountAuditedV1, uow: Any) -> None:
        handled.append(event)

    @dispatcher.handler(AllocatedV1)
    async def on_allocated(event: AllocatedV1, uow: Any) -> None:
        handled.append(event)

    return dispatcher


@pytest.fixture
def factory(warehouse: AsyncEngine, wh_dispatcher: InProcessDispatcher) -> Factory:
    return UnitOfWorkFactory(
        WarehouseUnitOfWork, create_session_factory(warehouse), dispatcher=wh_dispatcher
    )


async def scalar(engine: AsyncEngine, stmt: Any) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(stmt)


async def versions(engine: AsyncEngine, table: Table) -> dict[UUID, int]:
    async with engine.connect() as conn:
        return {
            row.id: row.version for row in await conn.execute(select(table.c.id, table.c.version))
        }


async def seed_accounts(factory: Factory, count: int) -> list[UUID]:
    async with factory() as uow:
        made = await uow.accounts.add_many(Account(name=f"a{i:05}") for i in range(count))
        await uow.commit()
    return [a.id for a in made]


async def seed_product(factory: Factory, *, batches_: int = 2, purchased: int = 100) -> UUID:
    async with factory() as uow:
        product = Product(
            sku="LAMP",
            batches=[Batch(reference=f"b{i}", purchased=purchased) for i in range(batches_)],
        )
        await uow.products.add(product)
        await uow.commit()
    return product.id


def audited_notes(rows: list[dict[str, Any]]) -> list[str]:
    return [r["payload"]["note"] for r in rows if r["event_name"] == "warehouse.account_audited"]


# -- 1. events of a root nobody holds any more ----------------------------------------------


async def audit_by_id(uow: WarehouseUnitOfWork, account_id: UUID, note: str) -> None:
    """An application helper: loads, records, returns - no reference survives it."""
    account = await uow.accounts.require(account_id)
    account.audit(note)


async def test_events_of_a_dropped_loaded_root_reach_handlers_and_outbox(
    factory: Factory, warehouse: AsyncEngine, handled: list[Any]
) -> None:
    (account_id,) = await seed_accounts(factory, 1)
    async with factory() as uow:
        await audit_by_id(uow, account_id, "by get")
        gc.collect()
        await uow.commit()
    assert [type(e) for e in uow.events] == [AccountAuditedV1]
    assert [e.note for e in handled] == ["by get"]
    assert audited_notes(await outbox_rows(warehouse)) == ["by get"]


async def test_every_load_path_holds_the_roots_it_loaded(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    ids = await seed_accounts(factory, 3)

    async def by_list(uow: WarehouseUnitOfWork) -> None:
        for account in await uow.accounts.list(sort="name"):
            account.audit(f"list {account.name}")

    async def by_query(uow: WarehouseUnitOfWork) -> None:
        account = await uow.accounts.query().filter(name="a00001").one()
        account.audit("query")

    async def by_raw_select(uow: WarehouseUnitOfWork) -> None:
        result = await uow.session.scalars(select(Account).where(Account.name == "a00002"))
        result.one().audit("raw select")

    async def by_in_bulk(uow: WarehouseUnitOfWork) -> None:
        (await uow.accounts.in_bulk([ids[0]]))[ids[0]].audit("in_bulk")

    for helper in (by_list, by_query, by_raw_select, by_in_bulk):
        async with factory() as uow:
            await helper(uow)
            gc.collect()
            await uow.commit()
    notes = audited_notes(await outbox_rows(warehouse))
    assert notes == [
        "list a00000",
        "list a00001",
        "list a00002",
        "query",
        "raw select",
        "in_bulk",
    ]


async def test_events_of_an_added_root_survive_an_autoflush_and_a_dropped_reference(
    factory: Factory, warehouse: AsyncEngine, handled: list[Any]
) -> None:
    async def open_account(uow: WarehouseUnitOfWork) -> None:
        account = Account(name="fresh")
        account.audit("opened")
        await uow.accounts.add(account)

    async with factory() as uow:
        await open_account(uow)
        await uow.accounts.count()  # autoflush: the new row is now only in the identity map
        gc.collect()
        await uow.commit()
    assert audited_notes(await outbox_rows(warehouse)) == ["opened"]
    assert [e.note for e in handled] == ["opened"]


async def test_events_of_a_root_deleted_and_flushed_are_kept(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    (account_id,) = await seed_accounts(factory, 1)
    async with factory() as uow:
        account = await uow.accounts.require(account_id)
        account.audit("closing")
        await uow.accounts.remove(account)
        del account
        await uow.accounts.count()  # the DELETE is flushed
        gc.collect()
        await uow.commit()
    assert audited_notes(await outbox_rows(warehouse)) == ["closing"]
    assert await scalar(warehouse, select(func.count()).select_from(accounts)) == 0


# -- 2. streams ----------------------------------------------------------------------------


async def test_stream_changing_every_root_keeps_every_event_and_bumps_each_once(
    factory: Factory, warehouse: AsyncEngine, handled: list[Any]
) -> None:
    ids = await seed_accounts(factory, 1000)
    before = await versions(warehouse, accounts)
    async with factory() as uow:
        async for account in uow.accounts.query().order_by("name").stream(chunk_size=100):
            account.deposit(5)
            account.audit(account.name)
        gc.collect()
        await uow.commit()
    rows = await outbox_rows(warehouse)
    assert len(audited_notes(rows)) == 1000
    assert sorted(audited_notes(rows)) == [f"a{i:05}" for i in range(1000)]
    assert sum(isinstance(e, Deposited) for e in handled) == 1000
    after = await versions(warehouse, accounts)
    assert all(after[i] == before[i] + 1 for i in ids)
    assert await scalar(warehouse, select(func.sum(accounts.c.balance))) == 5000


async def test_stream_over_roots_with_parts_keeps_events_and_guards_parts_changed_later(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    async with factory() as uow:
        await uow.products.add_many(
            Product(sku=f"P{i:03}", batches=[Batch(reference="b", purchased=10)])
            for i in range(120)
        )
        await uow.commit()
    before = await versions(warehouse, products)
    kept_batches: list[Batch] = []
    kept_products: list[Product] = []
    async with factory() as uow:
        line = OrderLine(sku="x", qty=1)
        async for product in uow.products.query().order_by("sku").stream(chunk_size=10):
            if product.sku < "P010":
                product.allocate(line)  # a part's many-to-many change and an event
            elif product.sku < "P020":
                kept_batches.append(product.batches[0])  # only a part is kept
            elif product.sku < "P030":
                kept_products.append(product)  # untouched for now
        del product
        gc.collect()
        # After the stream: change parts whose roots the stream let go of, and record
        # events on roots it let go of.
        for batch in kept_batches:
            batch.purchased += 1
        for kept in kept_products:
            kept.record(AllocatedV1(product_id=kept.id, line_id=line.id))
        kept_batches.clear()
        kept_products.clear()
        gc.collect()
        await uow.commit()
    after = await versions(warehouse, products)
    changed = {pid for pid in after if after[pid] != before[pid]}
    assert all(after[pid] == before[pid] + 1 for pid in changed)
    async with factory() as uow:
        by_sku = {p.sku: p.id for p in await uow.products.list(sort="sku", limit=1000)}
    assert changed == {by_sku[f"P{i:03}"] for i in range(20)}
    rows = await outbox_rows(warehouse)
    allocated = [
        r["payload"]["product_id"] for r in rows if r["event_name"] == "warehouse.allocated"
    ]
    assert sorted(allocated) == sorted(
        str(by_sku[f"P{i:03}"]) for i in [*range(10), *range(20, 30)]
    )


@pytest.mark.postgres_only  # SQLite's BEGIN IMMEDIATE serialises the two transactions
@pytest.mark.parametrize("meanwhile", ["changed", "deleted"])
async def test_a_kept_part_of_a_streamed_root_changed_elsewhere_meanwhile_conflicts(
    factory: Factory, warehouse: AsyncEngine, meanwhile: str
) -> None:
    product_id = await seed_product(factory, batches_=1, purchased=10)
    async with factory() as uow:
        await uow.products.add(Product(sku="ZZZ"))  # streamed last, in a chunk of its own
        await uow.commit()
    async with factory() as uow:
        stream = uow.products.query().order_by("sku").stream(chunk_size=1)
        kept = [p.batches[0] async for p in stream if p.sku == "LAMP"]
        gc.collect()  # the stream let go of the product; only its batch is held
        assert product_id not in {
            getattr(o, "id", None) for o in uow.session.sync_session.identity_map.values()
        }
        async with factory() as other:
            product = await other.products.require(product_id)
            if meanwhile == "changed":
                product.batches[0].purchased = 50
            else:
                await other.products.remove(product)
            await other.commit()
        kept[0].purchased += 1
        with pytest.raises(ConcurrencyConflict) as caught:
            await uow.commit()
    assert caught.value.entities == (f"Product({product_id})",)
    stored = await scalar(warehouse, select(func.max(batches.c.purchased)))
    assert stored == (50 if meanwhile == "changed" else None)


# -- 3. a failed commit leaves the aggregates retryable ------------------------------------


async def test_retry_after_a_handler_failure_on_the_insert_fast_path(
    warehouse: AsyncEngine,
) -> None:
    dispatcher = InProcessDispatcher()
    attempts: list[int] = []

    @dispatcher.handler(AccountAuditedV1)
    async def flaky(event: AccountAuditedV1, uow: Any) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("handler failed")

    factory = UnitOfWorkFactory(
        WarehouseUnitOfWork, create_session_factory(warehouse), dispatcher=dispatcher
    )
    fresh = [Account(name=f"n{i}") for i in range(3)]
    for account in fresh:
        account.audit(account.name)
    with pytest.raises(RuntimeError):
        async with factory() as uow:
            await uow.accounts.add_many(fresh)
            await uow.commit()
    assert [len(a.pending_events) for a in fresh] == [1, 1, 1]
    async with factory() as uow:
        await uow.accounts.add_many(fresh)  # the same objects
        await uow.commit()
    assert sorted(audited_notes(await outbox_rows(warehouse))) == ["n0", "n1", "n2"]
    assert await scalar(warehouse, select(func.count()).select_from(accounts)) == 3


async def test_retry_after_commit_fails_on_a_deferred_constraint(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    account = Account(name="late", referrer_id=new_id())  # no such referrer: fails at COMMIT
    account.audit("late")
    with pytest.raises(IntegrityViolation):
        async with factory() as uow:
            await uow.accounts.add(account)
            await uow.commit()
    assert await outbox_rows(warehouse) == []
    account.referrer_id = None
    async with factory() as uow:
        await uow.accounts.add(account)
        await uow.commit()
    assert audited_notes(await outbox_rows(warehouse)) == ["late"]


async def test_retry_after_a_failure_on_the_flush_path_writes_rows_and_outbox_once(
    warehouse: AsyncEngine,
) -> None:
    dispatcher = InProcessDispatcher()
    fail = [True]
    follow_ups: list[Any] = []

    @dispatcher.handler(AllocatedV1)
    async def on_allocated(event: AllocatedV1, uow: Any) -> None:
        account = await uow.accounts.query().filter(name="owner").one()
        account.audit(f"follow-up {event.line_id}")  # recorded by a handler
        follow_ups.append(event)
        if fail[0]:
            fail[0] = False
            raise RuntimeError("handler failed")

    factory = UnitOfWorkFactory(
        WarehouseUnitOfWork, create_session_factory(warehouse), dispatcher=dispatcher
    )
    async with factory() as uow:
        await uow.accounts.add(Account(name="owner"))
        await uow.commit()
    product = Product(sku="NEW", batches=[Batch(reference="b", purchased=5)])
    line = OrderLine(sku="NEW", qty=1)
    product.allocate(line)
    with pytest.raises(RuntimeError):
        async with factory() as uow:
            await uow.products.add(product)
            await uow.accounts.count()  # a flush: this commit takes the ORM flush path
            await uow.commit()
    assert len(product.pending_events) == 1  # given back; the handler's follow-up is not
    async with factory() as uow:
        await uow.products.add(product)
        await uow.commit()
    rows = await outbox_rows(warehouse)
    assert [r["event_name"] for r in rows] == ["warehouse.allocated", "warehouse.account_audited"]
    assert await scalar(warehouse, select(func.count()).select_from(allocations)) == 1
    assert len(follow_ups) == 2


async def test_a_loaded_root_of_a_failed_commit_is_refused_until_loaded_again(
    warehouse: AsyncEngine,
) -> None:
    dispatcher = InProcessDispatcher()

    @dispatcher.handler(Deposited)
    async def refuse(event: Deposited, uow: Any) -> None:
        raise RuntimeError("handler failed")

    factory = UnitOfWorkFactory(
        WarehouseUnitOfWork, create_session_factory(warehouse), dispatcher=dispatcher
    )
    (account_id,) = await seed_accounts(factory, 1)
    with pytest.raises(RuntimeError):
        async with factory() as uow:
            account = await uow.accounts.require(account_id)
            account.deposit(1)
            await uow.commit()
    async with factory() as uow:
        with pytest.raises(InvalidQuery, match="load it"):
            await uow.accounts.add(account)  # its change was rolled back with the commit
        again = await uow.accounts.require(account_id)
        assert again.balance == 0


# -- 4. a part's many-to-many collection is inside the aggregate ---------------------------


async def test_changing_only_a_parts_many_to_many_set_bumps_the_root_once(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    product_id = await seed_product(factory)
    (start,) = (await versions(warehouse, products)).values()
    async with factory() as uow:
        product = await uow.products.require(product_id)
        product.allocate(OrderLine(sku="LAMP", qty=3))
        await uow.accounts.count()  # autoflush in between
        product.allocate(OrderLine(sku="LAMP", qty=4))
        await uow.commit()
    assert (await versions(warehouse, products))[product_id] == start + 1
    async with factory() as uow:
        product = await uow.products.require(product_id)
        batch = next(b for b in product.batches if b.allocations)
        batch.allocations.pop()  # removal only
        await uow.commit()
    assert (await versions(warehouse, products))[product_id] == start + 2


async def test_a_part_changed_without_its_root_is_refused(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    product_id = await seed_product(factory, batches_=1)
    before = await versions(warehouse, products)
    async with factory() as uow:
        batch = (await uow.session.scalars(select(Batch))).one()  # no Product loaded
        batch.purchased += 1
        with pytest.raises(UnitOfWorkError, match="load the root"):
            await uow.commit()
    async with factory() as uow:
        stray = Batch(reference="stray", purchased=1)
        uow.session.add(stray)
        with pytest.raises(UnitOfWorkError, match="part of an aggregate"):
            await uow.session.flush()
    assert await versions(warehouse, products) == before
    async with factory() as uow:  # through the root it is a guarded change
        product = await uow.products.require(product_id)
        product.batches[0].purchased += 1
        await uow.commit()
    assert (await versions(warehouse, products))[product_id] == before[product_id] + 1


@pytest.mark.postgres_only  # SQLite's BEGIN IMMEDIATE serialises the two transactions
async def test_two_concurrent_allocations_against_one_batch_conflict(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    product_id = await seed_product(factory, batches_=1, purchased=10)
    loaded = asyncio.Barrier(2)
    first_done = asyncio.Event()
    outcomes: list[str] = []

    async def allocate(qty: int, first: bool) -> None:
        try:
            async with factory() as uow:
                product = await uow.products.require(product_id)
                await loaded.wait()
                product.allocate(OrderLine(sku="LAMP", qty=qty))
                if not first:
                    await first_done.wait()
                await uow.commit()
            outcomes.append("committed")
        except ConcurrencyConflict:
            outcomes.append("conflict")
        finally:
            if first:
                first_done.set()

    await asyncio.gather(allocate(8, True), allocate(8, False))
    assert sorted(outcomes) == ["committed", "conflict"]
    assert await scalar(warehouse, select(func.sum(lines.c.qty))) == 8


async def test_fifty_concurrent_writers_of_a_parts_many_to_many_set_lose_nothing(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    product_id = await seed_product(factory, batches_=1, purchased=1000)
    conflicts = 0

    async def allocate(i: int) -> None:
        nonlocal conflicts
        while True:
            try:
                async with factory() as uow:
                    product = await uow.products.require(product_id)
                    product.allocate(OrderLine(sku="LAMP", qty=1 + i % 3))
                    await uow.commit()
                return
            except (ConcurrencyConflict, DuplicateKey):
                conflicts += 1
            except Exception as exc:  # TransientError on a busy SQLite
                if type(exc).__name__ != "TransientError":
                    raise
                conflicts += 1

    await asyncio.gather(*(allocate(i) for i in range(50)))
    expected = sum(1 + i % 3 for i in range(50))
    async with factory() as uow:
        product = await uow.products.require(product_id)
        assert sum(len(b.allocations) for b in product.batches) == 50
        assert sum(line.qty for b in product.batches for line in b.allocations) == expected
    assert await scalar(warehouse, select(func.count()).select_from(allocations)) == 50
    # Every successful commit moved the version by exactly one.
    assert (await versions(warehouse, products))[product_id] == 1 + 50


# -- 5. every statement in a unit of work speaks qx's errors -------------------------------


async def test_autoflush_in_a_handler_raises_duplicate_key(warehouse: AsyncEngine) -> None:
    dispatcher = InProcessDispatcher()

    @dispatcher.handler(AccountAuditedV1)
    async def open_twin(event: AccountAuditedV1, uow: Any) -> None:
        await uow.accounts.add(Account(name="twin"))
        await uow.session.execute(select(func.count()).select_from(accounts))  # autoflush

    factory = UnitOfWorkFactory(
        WarehouseUnitOfWork, create_session_factory(warehouse), dispatcher=dispatcher
    )
    async with factory() as uow:
        await uow.accounts.add(Account(name="twin"))
        await uow.commit()
    with pytest.raises(DuplicateKey) as caught:
        async with factory() as uow:
            account = Account(name="first")
            account.audit("x")
            await uow.accounts.add(account)
            await uow.commit()
    assert caught.value.__cause__ is not None
    assert await scalar(warehouse, select(func.count()).select_from(accounts)) == 1


async def test_stale_version_through_a_raw_statement_is_a_concurrency_conflict(
    factory: Factory, warehouse: AsyncEngine
) -> None:
    (account_id,) = await seed_accounts(factory, 1)
    with pytest.raises(ConcurrencyConflict) as caught:
        async with factory() as uow:
            account = await uow.accounts.require(account_id)
            # Someone else's write, as far as this loaded copy knows.
            await uow.session.execute(
                update(accounts).where(accounts.c.id == account_id).values(version=99)
            )
            account.deposit(1)
            await uow.session.execute(select(Account.id))  # autoflush of the stale copy
    assert f"Account({account_id})" in str(caught.value)


async def test_raw_statement_errors_are_qx_errors(factory: Factory) -> None:
    async with factory() as uow:
        with pytest.raises(DatabaseError):
            await uow.session.execute(text("SELECT * FROM no_such_table"))


@pytest.mark.postgres_only  # statement_timeout is a PostgreSQL setting
async def test_statement_timeout_through_raw_session_is_statement_timeout(
    backend: str, tmp_path: Path
) -> None:
    engine, schema = await make_backend_engine(backend, tmp_path, statement_timeout=0.05)
    try:
        factory = UnitOfWorkFactory(WarehouseUnitOfWork, create_session_factory(engine))
        async with factory() as uow:
            with pytest.raises(StatementTimeout):
                await uow.session.execute(text("SELECT pg_sleep(2)"))
    finally:
        await engine.dispose()
        if schema is not None:
            from tests.integration.conftest import drop_schema

            await drop_schema(schema)


async def test_bus_retries_a_conflict_raised_by_an_autoflush(warehouse: AsyncEngine) -> None:
    factory = UnitOfWorkFactory(WarehouseUnitOfWork, create_session_factory(warehouse))
    (account_id,) = await seed_accounts(factory, 1)
    bus = MessageBus(retry=RetryPolicy(attempts=3, base_delay=0.001))
    bus.provide(uow_factory=factory)
    tries: list[int] = []

    @bus.handler(Deposit)
    async def deposit(command: Deposit, uow: WarehouseUnitOfWork) -> int:
        tries.append(1)
        account = await uow.accounts.require(command.account_id)
        if len(tries) == 1:
            await uow.session.execute(
                update(accounts).where(accounts.c.id == account.id).values(version=7)
            )
        account.deposit(10)
        await uow.accounts.count()  # autoflush: stale on the first try
        return account.balance

    assert await bus.execute(Deposit(account_id=account_id)) == 10
    assert len(tries) == 2


# -- 6. the in-memory SQLite default gives each unit of work its own transaction -----------


@pytest.mark.skip_on(
    "memory",
    reason="the testing kit's shared in-memory database lets readers see rows another unit "
    "of work flushed and has not committed (read_uncommitted); the sqlite case runs qx's "
    "plain :memory: engine",
)
async def test_concurrent_units_of_work_on_in_memory_sqlite_never_share_a_transaction(
    backend: str, tmp_path: Path
) -> None:
    if backend == "sqlite":
        engine = create_engine(DatabaseSettings(url="sqlite+aiosqlite:///:memory:"))
        schema = None
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    else:
        engine, schema = await engine_with_tables(backend, tmp_path, metadata)
    try:
        factory = UnitOfWorkFactory(WarehouseUnitOfWork, create_session_factory(engine))
        writer_flushed = asyncio.Event()
        seen: list[int] = []

        async def writer() -> None:
            async with factory() as uow:
                await uow.accounts.add(Account(name="P1"))
                await uow.session.flush()
                writer_flushed.set()
                for _ in range(20):
                    await asyncio.sleep(0)  # let the readers run
                await uow.accounts.add(Account(name="P2"))
                await uow.commit()

        async def reader() -> None:
            await writer_flushed.wait()
            async with factory() as uow:
                seen.append(await uow.accounts.count())

        await asyncio.gather(writer(), *(reader() for _ in range(5)))
        async with factory() as uow:
            names = [a.name for a in await uow.accounts.list(sort="name")]
        assert names == ["P1", "P2"]
        assert set(seen) <= {0, 2}  # never the writer's half-done transaction
    finally:
        await engine.dispose()
        if schema is not None:
            from tests.integration.conftest import drop_schema

            await drop_schema(schema)


# -- 7. what a loaded aggregate has that __init__ would have given it ----------------------


async def test_loaded_aggregates_get_unmapped_defaults_and_a_chosen_post_init(
    backend: str, tmp_path: Path
) -> None:
    md = make_metadata()
    reg = make_registry(md)

    @dataclass(eq=False, kw_only=True)
    class Shelf(AggregateRoot):
        id: UUID = field(default_factory=new_id)
        label: str
        version: int | None = None
        notes: list[str] = field(default_factory=list)  # not mapped
        colour: str = "grey"  # not mapped
        normalised: str = field(init=False, default="")

        def __post_init__(self) -> None:
            self.normalised = self.label.strip().lower()

        def bump_own_version(self) -> None:
            self.label += "!"
            assert self.version is not None
            self.version += 1  # the domain counts its own changes

    with pytest.raises(ConfigurationError, match="post_init='run'"):
        map_aggregate(reg, Shelf, Table("g_shelves_x", md, uuid_pk(), version_column()))
    shelves = Table(
        "g_shelves", md, uuid_pk(), Column("label", String(50), nullable=False), version_column()
    )
    map_aggregate(reg, Shelf, shelves, post_init="run")

    class Shelves(Repository[Shelf]):
        pass

    engine, schema = await engine_with_tables(backend, tmp_path, md)
    try:
        factory = UnitOfWorkFactory(UnitOfWork, create_session_factory(engine))
        async with factory() as uow:
            shelf = Shelf(label="  Top ", colour="red")
            await uow.repository(Shelves).add(shelf)
            await uow.commit()
        async with factory() as uow:
            loaded = await uow.repository(Shelves).require(shelf.id)
            assert loaded is not shelf
            assert loaded.notes == [] and loaded.colour == "grey"
            assert loaded.normalised == "top"
            loaded.notes.append("usable")
            loaded.bump_own_version()
            await uow.commit()
        assert (await versions(engine, shelves))[shelf.id] == 2  # once, not twice
        async with factory() as uow:
            loaded = await uow.repository(Shelves).require(shelf.id)
            assert loaded.version == 2
            loaded.version = 1
            with pytest.raises(UnitOfWorkError, match="may only grow"):
                await uow.commit()
    finally:
        await engine.dispose()
        if schema is not None:
            from tests.integration.conftest import drop_schema

            await drop_schema(schema)


async def test_post_init_that_records_events_is_refused_on_load(
    factory: Factory, store: InMemoryStore | None
) -> None:
    md = make_metadata()
    reg = make_registry(md)

    @dataclass(eq=False, kw_only=True)
    class Noisy(AggregateRoot):
        id: UUID = field(default_factory=new_id)
        version: int | None = None

        def __post_init__(self) -> None:
            self.record(Deposited(account_id=self.id, amount=0))

    table = Table("g_noisy", md, uuid_pk(), version_column())
    map_aggregate(reg, Noisy, table, post_init="run")
    skip_md = make_metadata()

    @dataclass(eq=False, kw_only=True)
    class Quiet(AggregateRoot):
        id: UUID = field(default_factory=new_id)
        version: int | None = None

        def __post_init__(self) -> None:
            raise AssertionError("never on load")

    map_aggregate(
        make_registry(skip_md),
        Quiet,
        Table("g_quiet", skip_md, uuid_pk(), version_column()),
        post_init="skip",
    )

    if store is not None:
        store.include(md, skip_md)
    async with factory() as uow:
        conn = await uow.session.connection()
        if store is None:
            await conn.run_sync(md.create_all)
            await conn.run_sync(skip_md.create_all)
        await conn.execute(table.insert().values(id=new_id(), version=1))
        await conn.execute(skip_md.tables["g_quiet"].insert().values(id=new_id(), version=1))
        with pytest.raises(ConfigurationError, match="recorded events"):
            await uow.session.scalars(select(Noisy))
        (quiet,) = (await uow.session.scalars(select(Quiet))).all()
        assert quiet.pending_events == ()
