"""Optimistic concurrency: stale writers conflict; a change anywhere in an aggregate counts.

Interleaved writers exist only on PostgreSQL: qx's SQLite default (``BEGIN IMMEDIATE``)
serializes writers when they begin, so no SQLite transaction can read a stale aggregate. With
``sqlite_begin="deferred"`` a stale SQLite writer fails with a retryable error instead.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import request_context
from qx.db import UnitOfWorkFactory, create_session_factory
from qx.errors import ConcurrencyConflict, TransientError
from qx.examples.orders.domain import Order
from qx.examples.orders.infrastructure import orders
from tests.integration.conftest import create_tables, make_backend_engine
from tests.integration.helpers import new_order
from tests.models import AppUnitOfWork, Counter

T = "tenant-a"
Factory = UnitOfWorkFactory[AppUnitOfWork]


async def test_fifty_concurrent_writers_with_retry_make_exactly_fifty_increments(
    uow_factory: Factory,
) -> None:
    async with uow_factory() as uow:
        counter = Counter(name="hot")
        await uow.counters.add(counter)
        await uow.commit()
    conflicts = 0

    async def writer() -> None:
        nonlocal conflicts
        for _ in range(500):
            try:
                async with uow_factory() as uow:
                    current = await uow.counters.require(counter.id)
                    current.increment()
                    await asyncio.sleep(0)  # let other writers interleave
                    await uow.commit()
                    return
            except (ConcurrencyConflict, TransientError):
                conflicts += 1
        raise AssertionError("writer gave up")

    await asyncio.gather(*(writer() for _ in range(50)))
    async with uow_factory() as uow:
        final = await uow.counters.require(counter.id)
    assert final.value == 50
    assert final.version == 51  # one bump per committed transaction


async def _commit_stale_counter(factory: Factory) -> tuple[Counter, Exception]:
    """Load a counter, let another unit of work change it, then commit the stale copy."""
    async with factory() as uow:
        counter = Counter(name="stale")
        await uow.counters.add(counter)
        await uow.commit()
    async with factory() as first:
        mine = await first.counters.require(counter.id)
        async with factory() as second:
            theirs = await second.counters.require(counter.id)
            theirs.increment()
            await second.commit()
        mine.increment()
        with pytest.raises(Exception) as info:
            await first.commit()
    return counter, info.value


@pytest.mark.postgres_only
async def test_stale_aggregate_raises_concurrency_conflict_naming_it(
    uow_factory: Factory,
) -> None:
    counter, error = await _commit_stale_counter(uow_factory)
    assert isinstance(error, ConcurrencyConflict)
    assert error.entities == (f"Counter({counter.id})",)
    assert str(counter.id) in str(error)


@pytest.mark.postgres_only
async def test_two_writers_changing_different_lines_of_one_order_conflict(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            order = new_order("alice", "A", "B")
            await uow.orders.add(order)
            await uow.commit()
        async with uow_factory() as first, uow_factory() as second:
            mine = await first.orders.require(order.id)
            theirs = await second.orders.require(order.id)
            mine.change_quantity("A", 5)
            theirs.change_quantity("B", 7)
            await first.commit()
            with pytest.raises(ConcurrencyConflict):
                await second.commit()
        async with uow_factory() as uow:
            final = await uow.orders.require(order.id)
    assert {line.sku: line.quantity for line in final.lines} == {"A": 5, "B": 1}
    assert final.version == 2


async def test_adding_a_line_bumps_the_root_version(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    from decimal import Decimal

    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            order = new_order("alice", "A")
            await uow.orders.add(order)
            await uow.commit()
        async with uow_factory() as uow:
            loaded = await uow.orders.require(order.id)
            loaded.add_line("Z", 1, Decimal("1.00"))
            await uow.session.flush()
            loaded.change_quantity("Z", 3)  # a second flush in the same transaction
            await uow.commit()
    async with engine.connect() as conn:
        version = await conn.scalar(select(orders.c.version).where(orders.c.id == order.id))
    assert version == 2  # bumped once per transaction, not once per flush


@pytest.mark.postgres_only
async def test_concurrent_removal_of_a_line_and_quantity_change_conflict(
    uow_factory: Factory,
) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            order = new_order("alice", "A", "B")
            await uow.orders.add(order)
            await uow.commit()
        async with uow_factory() as first, uow_factory() as second:
            mine = await first.orders.require(order.id)
            theirs = await second.orders.require(order.id)
            mine.lines.pop()  # delete-orphan removes the row
            theirs.change_quantity("A", 9)
            await first.commit()
            with pytest.raises(ConcurrencyConflict):
                await second.commit()


async def test_sqlite_deferred_stale_writer_gets_a_retryable_error(tmp_path: Path) -> None:
    engine, _ = await make_backend_engine(
        "sqlite", tmp_path, sqlite_begin="deferred", sqlite_busy_timeout=1
    )
    try:
        await create_tables(engine)
        factory = UnitOfWorkFactory(AppUnitOfWork, create_session_factory(engine))
        _, error = await _commit_stale_counter(factory)
        assert isinstance(error, ConcurrencyConflict | TransientError)
    finally:
        await engine.dispose()


async def test_only_net_changes_bump_the_root_version(uow_factory: Factory) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            order = new_order("alice", "A", "B")
            await uow.orders.add(order)
            await uow.commit()

        async def version_after(change: Callable[[Order], None]) -> int:
            async with uow_factory() as uow:
                # No reference to the loaded root survives change(): the identity map holds
                # objects weakly, yet a changed part must still bump its root.
                change(await uow.orders.require(order.id))
                gc.collect()
                await uow.commit()
            async with uow_factory() as uow:
                return (await uow.orders.require(order.id)).version

        def same_values(o: Order) -> None:
            o.customer = o.customer
            o.lines[0].quantity = o.lines[0].quantity

        def reassign_then_restore(o: Order) -> None:
            original = o.lines[1].quantity
            o.lines[1].quantity = original + 7
            o.lines[1].quantity = original

        def change_a_line(o: Order) -> None:
            o.lines[1].quantity += 1

        def drop_a_line(o: Order) -> None:
            o.lines.pop()

        assert await version_after(same_values) == 1
        assert await version_after(reassign_then_restore) == 1
        assert await version_after(change_a_line) == 2
        assert await version_after(drop_a_line) == 3


async def test_parts_changed_while_streaming_still_bump_their_roots(
    uow_factory: Factory,
) -> None:
    with request_context(tenant_id=T):
        async with uow_factory() as uow:
            await uow.orders.add_many([new_order(f"c{i:03}", "A") for i in range(30)])
            await uow.commit()
        async with uow_factory() as uow:
            changed_lines = []
            stream = uow.orders.query().order_by("customer").stream(chunk_size=4)
            async for position, streamed in _enumerate(stream):
                if position % 3 == 0:
                    streamed.lines[0].quantity += 1
                    changed_lines.append(streamed.lines[0])  # the part only, not the root
                del streamed
                if position % 4 == 3:  # once a chunk: everything streamed so far is dropped
                    gc.collect()
            await uow.commit()
        async with uow_factory() as uow:
            versions = [o.version for o in await uow.orders.query().order_by("customer").all()]
    assert versions == [2 if i % 3 == 0 else 1 for i in range(30)]


async def _enumerate(items: AsyncIterator[Order]) -> AsyncIterator[tuple[int, Order]]:
    position = 0
    async for item in items:
        yield position, item
        position += 1
