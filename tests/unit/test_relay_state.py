"""The relay's named states: the transition table, and a relay walking it on the embedded
database as the database and the broker come and go."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from qx.core import utcnow
from qx.errors import QxError
from qx.outbox import Envelope, OutboxRelay, RelayState, outbox_table, qx_metadata
from qx.outbox._leases import fair_share
from qx.outbox._relay_state import TRANSITIONS, StateMachine
from qx.outbox._table import OUTBOX_LANES
from qx.settings import RelaySettings
from qx.testing import MemoryPublisher


def test_every_state_has_its_moves_and_only_those() -> None:
    assert set(TRANSITIONS) == set(RelayState)
    assert TRANSITIONS[RelayState.STOPPED] == frozenset()
    assert TRANSITIONS[RelayState.STOPPING] == {RelayState.STOPPED}
    machine = StateMachine("r1")
    assert machine.state is RelayState.STARTING and machine.running
    machine.to(RelayState.BROKER_DOWN, "refused")
    machine.to(RelayState.BROKER_DOWN)  # staying is no move
    machine.to(RelayState.RELAYING)
    with pytest.raises(QxError, match="no transition from relaying to stopped"):
        machine.to(RelayState.STOPPED)
    machine.to(RelayState.STOPPING)
    assert not machine.running
    with pytest.raises(QxError, match="stopping to relaying"):
        machine.to(RelayState.RELAYING)
    machine.to(RelayState.STOPPED)


class Flaky(MemoryPublisher):
    """A broker that refuses connections while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def connect(self) -> None:
        if self.down:
            raise ConnectionRefusedError("connection refused")

    async def publish(self, envelope: Envelope) -> None:
        if self.down:
            raise ConnectionResetError("connection reset by peer")
        await super().publish(envelope)


async def eventually(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {what} within 20 s")


async def test_a_relay_names_where_it_is_as_the_database_and_the_broker_come_and_go(
    tmp_path: Path,
) -> None:
    # The database file's folder does not exist yet: every turn fails.
    folder = tmp_path / "later"
    engine = create_async_engine(f"sqlite+aiosqlite:///{folder / 'qx.sqlite3'}")
    publisher = Flaky()
    settings = RelaySettings(poll_interval=0.02, reconnect_delay=0.01, db_timeout=5)
    relay = OutboxRelay(engine, publisher, settings=settings)
    seen: list[RelayState] = []

    def at(state: RelayState) -> Callable[[], bool]:
        def check() -> bool:
            if not seen or seen[-1] is not relay.state:
                seen.append(relay.state)
            return relay.state is state

        return check

    assert relay.state is RelayState.STARTING
    task = asyncio.create_task(relay.run())
    try:
        await eventually(at(RelayState.DATABASE_DOWN), "database down")
        folder.mkdir()
        async with engine.begin() as conn:
            await conn.run_sync(qx_metadata.create_all)
        await eventually(at(RelayState.RELAYING), "relaying")
        publisher.down = True
        await eventually(at(RelayState.BROKER_DOWN), "broker down")
        publisher.down = False
        await eventually(at(RelayState.RELAYING), "relaying again")
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
        await engine.dispose()
    assert relay.state is RelayState.STOPPED
    assert seen == [
        RelayState.STARTING,
        RelayState.DATABASE_DOWN,
        RelayState.RELAYING,
        RelayState.BROKER_DOWN,
        RelayState.RELAYING,
    ]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 11, 12, 16, 63, 64, 65, 100])
def test_fair_shares_add_up_to_every_lane_and_differ_by_at_most_one(count: int) -> None:
    alive = [f"relay-{n}" for n in reversed(range(count))]  # any order: ranked by id
    shares = [fair_share(relay, alive, lanes=OUTBOX_LANES) for relay in alive]
    assert sum(shares) == OUTBOX_LANES
    assert max(shares) - min(shares) <= 1
    # A relay whose heartbeat is not in yet takes the smallest share.
    assert fair_share("relay-new", alive, lanes=OUTBOX_LANES) == min(shares)


class Stuck(MemoryPublisher):
    """A broker that never acknowledges (until released)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def publish(self, envelope: Envelope) -> None:
        await self.release.wait()
        await super().publish(envelope)


async def test_a_relay_with_no_room_for_a_claim_waits_without_spinning(
    tmp_path: Path,
) -> None:
    # Polling counts from the last claim; a relay that cannot claim (in-flight rows fill its
    # room) must wait for a run to finish, not turn in a loop.
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'qx.sqlite3'}")
    async with engine.begin() as conn:
        await conn.run_sync(qx_metadata.create_all)
        await conn.execute(
            outbox_table.insert(),
            [
                {
                    "id": uuid4(),
                    "event_name": "t.happened",
                    "event_version": 1,
                    "payload": {"n": n},
                    "headers": {},
                    "occurred_at": utcnow(),
                    "lane": n,
                }
                for n in range(3)
            ],
        )
    publisher = Stuck()
    settings = RelaySettings(batch_size=1, pipelines=1, poll_interval=0.2)
    relay = OutboxRelay(engine, publisher, settings=settings)
    turns = 0
    turn = relay._turn

    async def counted() -> None:
        nonlocal turns
        turns += 1
        await turn()

    relay._turn = counted  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(1.0)  # a relay that spins turns thousands of times meanwhile
        stuck = turns
        publisher.release.set()
        await eventually(lambda: len(publisher.published) == 3, "all published")
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
        await engine.dispose()
    assert stuck <= 20, f"{stuck} turns in a second with no room"
