"""Relays are woken after the writer's COMMIT, not by a NOTIFY inside it (PostgreSQL).

A NOTIFY inside a transaction makes its COMMIT wait for a lock shared by the whole
database; qx's outbox has no trigger any more and the unit of work wakes the relays after
its commit, from a connection of its own, coalescing the commits of a busy process.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.db import UnitOfWorkFactory
from qx.outbox import OutboxRelay
from qx.settings import RelaySettings
from qx.testing import MemoryPublisher
from tests import models

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


@pytest.fixture
def backend() -> str:
    return "postgresql"


async def _counters(factory: Factory, count: int) -> list[UUID]:
    async with factory() as uow:
        counters = [models.Counter(name=f"w{i}") for i in range(count)]
        await uow.counters.add_many(counters)
        await uow.commit()
    return [c.id for c in counters]


async def _bump(factory: Factory, ident: UUID) -> None:
    async with factory() as uow:
        (await uow.counters.require(ident)).increment(integration=True)
        await uow.commit()


async def test_the_outbox_has_no_trigger(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass('qx_outbox')")
        )
    assert found == 0


@pytest.mark.timeout(60)
async def test_a_relay_that_polls_once_a_minute_publishes_each_commit_at_once(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    ids = await _counters(uow_factory, 5)
    publisher = MemoryPublisher()
    relay = OutboxRelay(engine, publisher, settings=RelaySettings(poll_interval=60))
    task = asyncio.create_task(relay.run())
    loop = asyncio.get_running_loop()
    try:
        # The relay is listening once its first turn published the set-up commit's rows
        # (none here) and it holds its lanes.
        while not relay._leases.tokens:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for round_number in range(1, 4):
            started = loop.time()
            await asyncio.gather(*(_bump(uow_factory, ident) for ident in ids))
            while len(publisher.published) < 5 * round_number:
                # Far below the poll interval: only a wake-up gets them out this soon.
                assert loop.time() - started < 5, "the relay was not woken"
                await asyncio.sleep(0.01)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
