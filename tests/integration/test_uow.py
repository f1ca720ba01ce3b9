"""UnitOfWork: commit, rollback at every stage, event dispatch, outbox rows, lifecycle."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import DomainEvent, InProcessDispatcher, request_context
from qx.db import UnitOfWorkFactory, UnitOfWorkState
from qx.errors import DuplicateKey, IntegrityViolation, InvalidConsistencyToken, UnitOfWorkError
from qx.examples.orders.domain import OrderPlaced, OrderPlacedV1
from qx.examples.orders.infrastructure import order_lines, orders
from qx.outbox import outbox_table
from tests.integration.helpers import count_rows, new_order, outbox_rows
from tests.models import AppUnitOfWork, Attachment, Counter, Incremented, counters

T = "tenant-a"
Factory = UnitOfWorkFactory[AppUnitOfWork]


async def test_commit_persists_aggregate_and_outbox_with_context_ids(
    uow_factory: Factory, engine: AsyncEngine, dispatcher: InProcessDispatcher
) -> None:
    handled: list[Any] = []

    @dispatcher.handler(OrderPlaced)
    async def on_placed(event: OrderPlaced, uow: Any) -> None:
        handled.append(event)

    with request_context(tenant_id=T, correlation_id="corr-1", causation_id="cmd-1", user_id="u1"):
        async with uow_factory() as uow:
            order = new_order("alice", "A", "B")
            await uow.orders.add(order)
            await uow.commit()
        assert uow.state is UnitOfWorkState.CLOSED
    assert [e.order_id for e in handled] == [order.id]
    assert await count_rows(engine, orders) == 1
    assert await count_rows(engine, order_lines) == 2
    (row,) = await outbox_rows(engine)
    placed_v1 = next(e for e in uow.events if isinstance(e, OrderPlacedV1))
    assert row["id"] == placed_v1.event_id
    assert row["event_name"] == "orders.order_placed"
    assert row["event_version"] == 1
    assert row["aggregate_type"] == "Order"
    assert row["aggregate_id"] == str(order.id)
    assert row["correlation_id"] == "corr-1"
    assert row["causation_id"] == "cmd-1"
    assert row["tenant_id"] == T
    assert row["headers"] == {"user_id": "u1"}
    assert row["payload"] == {
        "order_id": str(order.id),
        "customer": "alice",
        "total": "20.00",
        "skus": ["A", "B"],
    }
    assert row["occurred_at"].tzinfo is not None
    assert row["published_at"] is None and row["attempts"] == 0


async def test_correlation_id_is_generated_when_context_has_none(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            await uow.orders.add(new_order())
            await uow.commit()
    (row,) = await outbox_rows(engine)
    assert row["correlation_id"] == uow.correlation_id
    assert len(uow.correlation_id) == 36


async def test_leaving_without_commit_rolls_back(uow_factory: Factory, engine: AsyncEngine) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            await uow.orders.add(new_order())
            await uow.session.flush()  # the rows reached the database...
        assert uow.state is UnitOfWorkState.CLOSED
    assert await count_rows(engine, orders) == 0  # ...and were rolled back
    assert await count_rows(engine, outbox_table) == 0


async def test_exception_in_block_rolls_back(uow_factory: Factory, engine: AsyncEngine) -> None:
    with request_context(tenant_id=T), pytest.raises(RuntimeError):
        async with uow_factory() as uow:
            await uow.orders.add(new_order())
            await uow.session.flush()
            raise RuntimeError("boom")
    assert await count_rows(engine, orders) == 0


async def test_failure_in_handler_rolls_back_everything(
    uow_factory: Factory, engine: AsyncEngine, dispatcher: InProcessDispatcher
) -> None:
    @dispatcher.handler(OrderPlaced)
    async def explode(event: OrderPlaced, uow: Any) -> None:
        await uow.counters.add(Counter(name="written-by-handler"))
        await uow.session.flush()
        raise ValueError("handler failed")

    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            await uow.orders.add(new_order())
            with pytest.raises(ValueError, match="handler failed"):
                await uow.commit()
            assert uow.state is UnitOfWorkState.ROLLED_BACK
            with pytest.raises(UnitOfWorkError):
                await uow.commit()
    assert await count_rows(engine, orders) == 0
    assert await count_rows(engine, counters) == 0
    assert await count_rows(engine, outbox_table) == 0


async def test_failure_at_flush_rolls_back_everything(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    async with uow_factory() as uow:
        await uow.counters.add(Counter(name="dup"))
        await uow.commit()
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            await uow.orders.add(new_order())
            await uow.counters.add(Counter(name="dup"))
            with pytest.raises(DuplicateKey) as info:
                await uow.commit()
    assert info.value.__cause__ is not None
    assert await count_rows(engine, orders) == 0
    assert await count_rows(engine, counters) == 1
    assert await count_rows(engine, outbox_table) == 0


async def test_failure_at_outbox_insert_rolls_back_everything(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            first = new_order()
            await uow.orders.add(first)
            await uow.commit()
        event_id = next(e for e in uow.events if isinstance(e, OrderPlacedV1)).event_id
        async with uow_factory() as uow:
            order = new_order("bob")
            # Re-record an integration event whose id is already in the outbox.
            order.collect_events()
            order.record(
                OrderPlacedV1(
                    event_id=event_id, order_id=order.id, customer="bob", total=Decimal(0), skus=()
                )
            )
            await uow.orders.add(order)
            with pytest.raises(DuplicateKey):
                await uow.commit()
    assert await count_rows(engine, orders) == 1
    assert await count_rows(engine, outbox_table) == 1


async def test_failure_at_commit_rolls_back_everything(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    from qx.core import new_id

    async with uow_factory() as uow:
        await uow.counters.add(Counter(name="kept-out"))
        # DEFERRED foreign key: the flush succeeds, the COMMIT itself fails.
        await uow.attachments.add(Attachment(counter_id=new_id()))
        with pytest.raises(IntegrityViolation) as info:
            await uow.commit()
        assert uow.state is UnitOfWorkState.ROLLED_BACK
    assert info.value.sqlstate == "23503"
    assert await count_rows(engine, counters) == 0


async def test_events_of_loaded_aggregates_are_dispatched_and_outboxed(
    uow_factory: Factory, engine: AsyncEngine, dispatcher: InProcessDispatcher
) -> None:
    seen: list[int] = []

    @dispatcher.handler(Incremented)
    async def on_inc(event: Incremented, uow: Any) -> None:
        seen.append(event.value)

    async with uow_factory() as uow:
        counter = Counter(name="c")
        await uow.counters.add(counter)
        await uow.commit()
    async with uow_factory() as uow:
        loaded = await uow.counters.require(counter.id)
        assert loaded is not counter
        loaded.increment(integration=True)
        await uow.commit()
    assert seen == [1]
    rows = await outbox_rows(engine)
    assert [r["event_name"] for r in rows] == ["tests.counter_changed"]
    assert rows[0]["payload"] == {"counter_id": str(counter.id), "value": 1}


async def test_events_raised_by_handlers_are_dispatched_with_causation(
    uow_factory: Factory, engine: AsyncEngine, dispatcher: InProcessDispatcher
) -> None:
    async with uow_factory() as uow:
        counter = Counter(name="stock")
        await uow.counters.add(counter)
        await uow.commit()
    chain: list[str] = []

    @dispatcher.handler(OrderPlaced)
    async def reserve(event: OrderPlaced, uow: Any) -> None:
        chain.append("placed")
        stock = await uow.counters.require(counter.id)
        stock.increment(integration=True)  # recorded while handling OrderPlaced

    @dispatcher.handler(Incremented)
    async def after_reserve(event: Incremented, uow: Any) -> None:
        chain.append(f"incremented:{event.value}")

    with request_context(tenant_id=T, causation_id="cmd-9"):
        async with uow_factory() as uow:
            await uow.orders.add(new_order())
            await uow.commit()
    assert chain == ["placed", "incremented:1"]
    placed = next(e for e in uow.events if isinstance(e, OrderPlaced))
    rows = {r["event_name"]: r for r in await outbox_rows(engine)}
    assert rows["orders.order_placed"]["causation_id"] == "cmd-9"
    assert rows["tests.counter_changed"]["causation_id"] == str(placed.event_id)


@pytest.mark.parametrize("depth", [1, 3])
async def test_event_depth_limit_raises_and_rolls_back(
    session_factory: Any, engine: AsyncEngine, depth: int
) -> None:
    @dataclass_event
    class Ping(DomainEvent):
        n: int

    dispatcher = InProcessDispatcher()

    @dispatcher.handler(Ping)
    async def ping_again(event: Ping, uow: Any) -> None:
        uow.emit(Ping(n=event.n + 1))

    factory = UnitOfWorkFactory(
        AppUnitOfWork, session_factory, dispatcher=dispatcher, max_event_depth=depth
    )
    async with factory() as uow:
        await uow.counters.add(Counter(name="loop"))
        uow.emit(Ping(n=0))
        with pytest.raises(UnitOfWorkError, match=f"after {depth} dispatch rounds"):
            await uow.commit()
    assert await count_rows(engine, counters) == 0


def dataclass_event(cls: type) -> Any:
    from dataclasses import dataclass

    return dataclass(frozen=True, kw_only=True)(cls)


async def test_lifecycle_errors(uow_factory: Factory) -> None:
    uow = uow_factory()
    with pytest.raises(UnitOfWorkError, match="inside 'async with'"):
        _ = uow.counters
    async with uow:
        repo = uow.counters
        await uow.commit()
        with pytest.raises(UnitOfWorkError, match="committed"):
            await uow.commit()
        with pytest.raises(UnitOfWorkError):
            await repo.list()
    with pytest.raises(UnitOfWorkError, match="closed"):
        await repo.get(Counter(name="x").id)
    with pytest.raises(UnitOfWorkError, match="entered once"):
        async with uow:
            pass


async def test_commit_from_a_handler_is_refused(
    uow_factory: Factory, engine: AsyncEngine, dispatcher: InProcessDispatcher
) -> None:
    @dispatcher.handler(Incremented)
    async def sneaky(event: Incremented, uow: Any) -> None:
        await uow.commit()

    async with uow_factory() as uow:
        counter = Counter(name="n")
        counter.increment()
        await uow.counters.add(counter)
        with pytest.raises(UnitOfWorkError, match="in progress"):
            await uow.commit()
    assert await count_rows(engine, counters) == 0


async def test_after_commit_hooks_run_after_commit_and_failures_do_not_undo(
    uow_factory: Factory, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def async_hook() -> None:
        calls.append(f"async:{await count_rows(engine, counters)}")

    def failing_hook() -> None:
        raise RuntimeError("hook failed")

    async with uow_factory() as uow:
        await uow.counters.add(Counter(name="h"))
        uow.on_commit(async_hook)
        uow.on_commit(failing_hook)
        uow.on_commit(lambda: calls.append("sync"))
        await uow.commit()
    assert calls == ["async:1", "sync"]
    assert "hook failed" in caplog.text
    assert await count_rows(engine, counters) == 1


async def test_cancellation_inside_the_block_rolls_back_and_releases_connection(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    started = asyncio.Event()

    async def worker() -> None:
        async with uow_factory() as uow:
            await uow.counters.add(Counter(name="cancelled"))
            await uow.session.flush()
            started.set()
            await asyncio.sleep(30)
            await uow.commit()

    task = asyncio.create_task(worker())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await count_rows(engine, counters) == 0
    assert engine.sync_engine.pool.checkedout() == 0


async def test_a_unit_of_work_that_ran_no_statement_commits_without_a_connection(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    # A command that decides there is nothing to do still commits: that must not cost a
    # connection, a BEGIN and a question about the transaction's fate.
    checkouts: list[object] = []

    def checkout(*_args: object) -> None:
        checkouts.append(None)

    event.listen(engine.sync_engine.pool, "checkout", checkout)
    try:
        with request_context(tenant_id="t1"):
            async with uow_factory() as uow:
                await uow.commit()
            assert checkouts == []
            async with uow_factory() as uow:
                order = new_order("nothing-then-something", "A")
                await uow.orders.add(order)
                await uow.commit()
            assert checkouts  # (PostgreSQL: a second one wakes the relays after COMMIT)
            async with uow_factory() as uow:
                assert (await uow.orders.require(order.id)).customer == "nothing-then-something"
    finally:
        event.remove(engine.sync_engine.pool, "checkout", checkout)


async def test_a_read_only_unit_of_work_reads_and_refuses_writes_on_every_backend(
    uow_factory: Factory,
) -> None:
    # Same code path with or without replicas: the kit and SQLite read on their one database.
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            order = new_order("read-only", "A")
            await uow.orders.add(order)
            await uow.commit()
        async with uow_factory.read_only() as uow:
            loaded = await uow.orders.require(order.id)
            assert loaded.customer == "read-only"
            loaded.customer = "changed"
            with pytest.raises(UnitOfWorkError, match="read-only"):
                await uow.commit()
        async with uow_factory.read_only() as uow:
            assert (await uow.orders.require(order.id)).customer == "read-only"
            assert uow.consistency_token is None
            # Rows are locked where they are changed: never in a read-only unit of work,
            # which may be on a replica.
            with pytest.raises(UnitOfWorkError, match="cannot lock"):
                await uow.orders.query().filter(customer="read-only").for_update().all()
        with pytest.raises(InvalidConsistencyToken):
            async with uow_factory.read_only(consistency_token="forged.token"):
                pass


async def test_a_read_only_unit_of_work_refuses_new_aggregates(uow_factory: Factory) -> None:
    # New aggregates alone go through the insert path, not the flush: refused all the same,
    # before anything is sent (SQLite has no read-only transactions to refuse them).
    with request_context(tenant_id="t1"):
        async with uow_factory.read_only() as uow:
            await uow.orders.add(new_order("never", "A"))
            with pytest.raises(UnitOfWorkError, match="read-only"):
                await uow.commit()
        async with uow_factory() as uow:
            assert await uow.orders.query().filter(customer="never").count() == 0
