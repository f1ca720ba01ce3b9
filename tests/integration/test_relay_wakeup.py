"""Relays are woken after the writer's COMMIT, not by a NOTIFY inside it (PostgreSQL).

A NOTIFY inside a transaction makes its COMMIT wait for a lock shared by the whole
database; qx's outbox has no trigger any more and the unit of work wakes the relays after
its commit, from a connection of its own, coalescing the commits of a busy process. The
commit does not wait for that NOTIFY: a program that commits and ends at once must leave
no connection open and no task behind.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.db import UnitOfWorkFactory
from qx.outbox import OutboxRelay
from qx.settings import RelaySettings
from qx.testing import MemoryPublisher
from tests import models
from tests.integration.conftest import pg_url_for

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


async def _listening(relay: OutboxRelay) -> None:
    # The relay is listening once its first turn is done and it holds its lanes.
    while not relay._leases.tokens:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


@pytest.mark.timeout(120)
async def test_bursts_of_commits_each_wake_the_relay(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    """Generated bursts: commits that land while a NOTIFY is on its way, one landing just
    as the sender decides to stop, lone ones. Each burst's last commit must still wake the
    relay (it polls once a minute), so no commit is left without a NOTIFY sent after it."""
    rng = random.Random(23)
    ids = await _counters(uow_factory, 8)
    publisher = MemoryPublisher()
    relay = OutboxRelay(engine, publisher, settings=RelaySettings(poll_interval=60))
    task = asyncio.create_task(relay.run())
    loop = asyncio.get_running_loop()

    async def bump_after(ident: UUID, yields: int) -> None:
        for _ in range(yields):  # lands at a different point of the sender's round trip
            await asyncio.sleep(0)
        await _bump(uow_factory, ident)

    try:
        await _listening(relay)
        expected = 0
        for _ in range(25):
            chosen = rng.sample(ids, rng.randint(1, len(ids)))
            started = loop.time()
            await asyncio.gather(*(bump_after(i, rng.randint(0, 30)) for i in chosen))
            expected += len(chosen)
            while len(publisher.published) < expected:
                assert loop.time() - started < 10, "a commit was left without a wake-up"
                await asyncio.sleep(0.01)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
    assert len(publisher.published) == expected


_PROGRAM = """
import asyncio, gc, sys
from qx.core import InProcessDispatcher
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.outbox import OutboxStage
from qx.settings import DatabaseSettings
from tests import models

async def main(url: str, schema: str, linger: bool) -> None:
    engine = create_engine(
        DatabaseSettings(url=url), connect_args={"server_settings": {"search_path": schema}}
    )
    outbox = OutboxStage()
    factory = UnitOfWorkFactory(
        models.AppUnitOfWork,
        create_session_factory(engine),
        dispatcher=InProcessDispatcher(),
        stages=[outbox],
    )
    async with factory() as uow:
        counter = models.Counter(name="last words")
        counter.increment(integration=True)
        await uow.counters.add(counter)
        await uow.commit()
    await engine.dispose()
    if linger:
        # Other work goes on until the wake-up is done with its connection; otherwise the
        # loop ends (cancelling what is left) at once.
        await outbox.settled()
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "qx-relay-wakeup"]
    gc.collect()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "linger"))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["at once", "linger"])
async def test_a_program_that_commits_and_disposes_of_its_engine_leaves_nothing_open(
    engine: AsyncEngine, ending: str
) -> None:
    """The wake-up is still on its way when the program disposes of its engine, then its
    loop ends at once or after other work: no unclosed connection, no pending task, and
    the commit is there."""
    async with engine.connect() as conn:
        schema = await conn.scalar(text("SELECT current_schema()"))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-W", "error", "-c", _PROGRAM, pg_url_for(engine), str(schema), ending],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert (done.returncode, done.stderr) == (0, "")
    async with engine.connect() as conn:
        rows = await conn.scalar(text("SELECT count(*) FROM qx_outbox"))
    assert rows == 1
