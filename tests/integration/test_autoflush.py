"""Loads by primary key do not flush what they cannot read, on every backend.

A loop of ``require()`` and a change in one unit of work used to autoflush before every
load: one flush and one UPDATE per row instead of one flush at commit. A primary-key load
reads only its own rows, so changes pending on other rows wait for the commit; a load that
could read a pending change (a new object with that key) still flushes first, and so does
any other query (it may read the changed rows).

Statements are counted with an engine event, as the database sees them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.db import UnitOfWorkFactory
from tests import models

Factory = UnitOfWorkFactory[models.AppUnitOfWork]
ROWS = 200


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every statement's verb (``SELECT``, ``UPDATE``, …) the engine runs meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def counters(factory: Factory, count: int) -> list[UUID]:
    async with factory() as uow:
        made = [models.Counter(name=f"af{i}") for i in range(count)]
        await uow.counters.add_many(made)
        await uow.commit()
    return [c.id for c in made]


async def values(engine: AsyncEngine) -> dict[int, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(models.counters.c.value, func.count()).group_by(models.counters.c.value)
        )
        return {int(value): int(n) for value, n in rows}


async def test_a_loop_of_require_and_change_flushes_once_at_commit(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    ids = await counters(uow_factory, ROWS)
    async with uow_factory() as uow:
        with statements(engine) as seen:
            for ident in ids:
                (await uow.counters.require(ident)).increment()
        assert seen.count("SELECT") == ROWS
        # No flush: no write at all (the kit may ATTACH its store to a pooled connection).
        assert [verb for verb in seen if verb in ("INSERT", "UPDATE", "DELETE")] == []
        # A query that reads the changed table sees every pending change.
        assert await uow.counters.count(value=1) == ROWS
        await uow.commit()
    assert await values(engine) == {1: ROWS}


async def test_a_loop_of_require_and_remove_deletes_at_commit(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    ids = await counters(uow_factory, ROWS)
    async with uow_factory() as uow:
        with statements(engine) as seen:
            for ident in ids:
                await uow.counters.remove(await uow.counters.require(ident))
        assert "DELETE" not in seen
        assert await uow.counters.count() == 0  # flushed first: it reads the table
        await uow.commit()
    assert await values(engine) == {}


async def test_a_load_by_the_key_of_a_pending_new_object_flushes_it_first(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    (old,) = await counters(uow_factory, 1)
    async with uow_factory() as uow:
        (await uow.counters.require(old)).increment()
        fresh = models.Counter(name="fresh")
        await uow.counters.add(fresh)
        with statements(engine) as seen:
            found = await uow.counters.in_bulk([fresh.id, old])
        assert found == {fresh.id: fresh, old: found[old]}
        assert "INSERT" in seen  # the load could read the new row: flushed before it
        await uow.commit()
    assert await values(engine) == {0: 1, 1: 1}


async def test_in_bulk_does_not_flush_changes_to_other_rows(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    first, *rest = await counters(uow_factory, 5)
    async with uow_factory() as uow:
        (await uow.counters.require(first)).increment()
        with statements(engine) as seen:
            found = await uow.counters.in_bulk(rest)
        assert sorted(found) == sorted(rest)
        assert "UPDATE" not in seen
        await uow.commit()
    assert await values(engine) == {0: 4, 1: 1}


async def test_a_removed_row_is_gone_before_its_delete_is_flushed_and_can_be_replaced(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    (ident,) = await counters(uow_factory, 1)
    async with uow_factory() as uow:
        with statements(engine) as seen:
            await uow.counters.remove(await uow.counters.require(ident))
            assert await uow.counters.get(ident) is None  # the identity map still holds it
        assert "DELETE" not in seen
        # A replacement with the same unique name: the DELETE runs before its INSERT.
        await uow.counters.add(models.Counter(name="af0", value=7))
        await uow.commit()
    assert await values(engine) == {7: 1}


async def test_a_load_by_a_key_just_given_to_a_loaded_row_flushes_it_first(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    factory = uow_factory
    # Loads by key skip the autoflush; a loaded row whose key was changed is a pending
    # change such a load can read, so it must flush first - whether the key was changed
    # in the session or while the row was detached.
    first, second = await counters(factory, 2)
    moved, moved_again = uuid4(), uuid4()
    async with factory() as uow:
        counter = await uow.counters.require(first)
        for ident in await counters_to_touch(uow, 3):
            (await uow.counters.require(ident)).value += 1
        counter.id = moved
        assert await uow.counters.get(moved) is counter
        assert await uow.counters.get(first) is None
        await uow.commit()
    async with factory() as uow:
        detached = await uow.counters.require(second)
    detached.id = moved_again
    async with factory() as uow:
        uow.session.add(detached)
        assert await uow.counters.get(moved_again) is detached
        await uow.commit()
    async with engine.connect() as conn:
        found = set(await conn.scalars(select(models.counters.c.id)))
    assert {moved, moved_again} <= found and not {first, second} & found


async def counters_to_touch(uow: models.AppUnitOfWork, count: int) -> list[UUID]:
    made = [models.Counter(name=f"touch{i}") for i in range(count)]
    await uow.counters.add_many(made)
    await uow.session.flush()
    return [c.id for c in made]
