"""The outbox relay with the in-memory publisher, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import inspect
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import FixedClock, request_context, utcnow
from qx.db import UnitOfWorkFactory
from qx.errors import PublishError
from qx.outbox import Envelope, OutboxRelay, OutboxStore, outbox_table
from qx.outbox._relay_sql_postgres import PostgresRelaySql
from qx.settings import RelaySettings
from qx.testing import MemoryPublisher
from tests import models

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


async def make_counters(factory: Factory, count: int) -> list[UUID]:
    ids = []
    with request_context(
        correlation_id="corr-1", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    ):
        async with factory() as uow:
            for i in range(count):
                counter = models.Counter(name=f"c{i}")
                await uow.counters.add(counter)
                ids.append(counter.id)
            await uow.commit()
    return ids


async def bump(factory: Factory, ident: UUID, times: int = 1) -> None:
    for _ in range(times):
        async with factory() as uow:
            counter = await uow.counters.require(ident)
            counter.increment(integration=True)
            await uow.commit()


async def rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(select(outbox_table).order_by(outbox_table.c.position))
        return [dict(r._mapping) for r in result.all()]


class FlakyPublisher(MemoryPublisher):
    """Fails for chosen event values (``CounterChangedV1.value``) of chosen counters."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[tuple[str, int]] = set()

    async def publish(self, envelope: Envelope) -> None:
        key = (str(envelope.data["counter_id"]), int(envelope.data["value"]))
        if key in self.failing:
            raise PublishError(f"broker refused {key}")
        await super().publish(envelope)


async def test_relay_publishes_envelopes_and_marks_rows(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    (ident,) = await make_counters(uow_factory, 1)
    with request_context(tenant_id=None, correlation_id="corr-2"):
        await bump(uow_factory, ident, 3)
    publisher = MemoryPublisher()
    relay = OutboxRelay(engine, publisher, source="tests")
    result = await relay.run_once()
    assert (result.claimed, result.published, result.failed) == (3, 3, 0)
    assert [e.data["value"] for e in publisher.published] == [1, 2, 3]
    first = publisher.published[0]
    stored = (await rows(engine))[0]
    assert first.id == stored["id"]
    assert first.type == "tests.counter_changed" and first.version == 1
    assert first.source == "tests"
    assert (first.aggregate_type, first.aggregate_id) == ("Counter", str(ident))
    assert first.correlation_id == "corr-2"
    assert first.time == stored["occurred_at"]
    attributes = first.attributes()
    assert attributes["specversion"] == "1.0" and attributes["subject"] == f"Counter/{ident}"
    assert Envelope.from_json(first.to_json()) == first
    assert await _all_published(engine)
    assert (await relay.run_once()).claimed == 0


async def test_failure_holds_back_only_its_aggregate(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    a, b = await make_counters(uow_factory, 2)
    await bump(uow_factory, a, 3)
    await bump(uow_factory, b, 2)
    publisher = FlakyPublisher()
    publisher.failing = {(str(a), 2)}
    clock = FixedClock(utcnow())
    settings = RelaySettings(max_attempts=3, backoff_base=10, backoff_max=60)
    relay = OutboxRelay(engine, publisher, settings=settings, clock=clock)
    result = await relay.run_once()
    assert (result.published, result.failed, result.dead) == (3, 1, 0)
    published = [(e.data["counter_id"], e.data["value"]) for e in publisher.published]
    assert published == [(str(a), 1), (str(b), 1), (str(b), 2)]
    failed = next(r for r in await rows(engine) if r["attempts"])
    assert failed["last_error"] == f"broker refused ({str(a)!r}, 2)"
    assert failed["next_attempt_at"] >= clock.now() + timedelta(seconds=5)
    # Not due yet: nothing of aggregate a moves, not even its third event.
    assert (await relay.run_once()).claimed == 0
    for _attempt in (2, 3):
        clock.advance(timedelta(seconds=61))
        result = await relay.run_once()
        # The head and the row behind it are claimed; the head fails, so neither goes out.
        assert (result.claimed, result.failed, result.published) == (2, 1, 0)
    assert result.dead == 1
    store = OutboxStore(engine)
    status = await store.status(now=clock.now())
    assert (status.dead, status.parked, status.pending, status.in_retry) == (1, 1, 1, 0)
    # The dead row parks its aggregate: the third event waits behind it, however long.
    clock.advance(timedelta(days=30))
    assert (await relay.run_once()).claimed == 0
    problems = await store.problems()
    assert [(p.state, p.attempts, p.aggregate) for p in problems] == [
        ("dead", 3, f"Counter/{a}"),
        ("parked", 0, f"Counter/{a}"),
    ]
    # Requeue revives it and unparks the aggregate: both go out, in order.
    publisher.failing.clear()
    assert await store.requeue(now=clock.now(), event_name="tests.counter_changed") == 1
    assert (await relay.run_once()).published == 2
    of_a = [e.data["value"] for e in publisher.published if e.data["counter_id"] == str(a)]
    assert of_a == [1, 2, 3]
    assert (await store.status(now=clock.now())).pending == 0


async def test_purge_deletes_old_published_rows_in_batches(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    (ident,) = await make_counters(uow_factory, 1)
    await bump(uow_factory, ident, 5)
    await OutboxRelay(engine, MemoryPublisher()).run_once()
    await bump(uow_factory, ident, 1)  # pending: never purged
    async with engine.begin() as conn:
        await conn.execute(
            update(outbox_table)
            .where(outbox_table.c.published_at.is_not(None))
            .values(published_at=utcnow() - timedelta(days=10))
        )
    store = OutboxStore(engine)
    assert await store.purge(older_than=utcnow() - timedelta(days=7), batch_size=2) == 5
    remaining = await rows(engine)
    assert len(remaining) == 1 and remaining[0]["published_at"] is None


@pytest.mark.postgres_only
async def test_concurrent_relays_keep_per_aggregate_order(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    ids = await make_counters(uow_factory, 20)
    await asyncio.gather(*(bump(uow_factory, ident, 10) for ident in ids))
    publisher = MemoryPublisher()
    settings = RelaySettings(batch_size=7, concurrency=4)
    relays = [OutboxRelay(engine, publisher, settings=settings) for _ in range(4)]

    async def drain(relay: OutboxRelay) -> None:
        # Lanes move between the relays as they come and go, so each keeps going until the
        # outbox is empty, whatever it sees itself.
        deadline = asyncio.get_running_loop().time() + 30
        while not await _all_published(engine):
            assert asyncio.get_running_loop().time() < deadline, "not drained"
            if not (await relay.run_once()).claimed:
                await asyncio.sleep(0.01)

    await asyncio.gather(*(drain(relay) for relay in relays))
    by_counter: dict[str, list[int]] = {}
    for envelope in publisher.published:
        by_counter.setdefault(envelope.data["counter_id"], []).append(envelope.data["value"])
    assert len(publisher.published) == 200
    assert all(values == list(range(1, 11)) for values in by_counter.values()), by_counter


@pytest.mark.postgres_only
async def test_relay_wakes_on_notify_and_survives_a_killed_connection(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    (ident,) = await make_counters(uow_factory, 1)
    publisher = MemoryPublisher()
    relay = OutboxRelay(
        engine, publisher, settings=RelaySettings(poll_interval=30, reconnect_delay=0.1)
    )
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(0.3)  # listening
        await bump(uow_factory, ident)
        await _until(lambda: len(publisher.published) == 1, 3.0)  # far below poll_interval
        # Kill only once the batch committed: killed before its COMMIT, the row is rightly
        # published again (at least once), which is not what this test is about.
        await _until(lambda: _all_published(engine), 5.0)
        async with engine.connect() as conn:
            killed = await conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name = current_setting('application_name')"
                )
            )
        assert killed
        await asyncio.sleep(0.3)
        await bump(uow_factory, ident)
        await _until(lambda: len(publisher.published) == 2, 10.0)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
    assert [e.data["value"] for e in publisher.published] == [1, 2]


async def _all_published(engine: AsyncEngine) -> bool:
    return all(r["published_at"] is not None for r in await rows(engine))


async def _until(condition: Any, seconds: float) -> None:
    """Poll ``condition`` (plain or async) until it holds; fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await _holds(condition):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def _holds(condition: Any) -> bool:
    outcome = condition()
    return bool(await outcome if inspect.isawaitable(outcome) else outcome)


class GatedPublisher(MemoryPublisher):
    """Holds every publish until ``gate`` opens; ``entered`` tells that one is waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def publish(self, envelope: Envelope) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().publish(envelope)


async def test_stop_during_a_batch_ends_the_run_after_that_batch(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    (ident,) = await make_counters(uow_factory, 1)
    await bump(uow_factory, ident)
    publisher = GatedPublisher()
    relay = OutboxRelay(engine, publisher, settings=RelaySettings(poll_interval=30))
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(publisher.entered.wait(), 5)
    relay.stop()  # mid-batch: the loop must not then sleep a whole poll_interval
    publisher.gate.set()
    await asyncio.wait_for(task, 5)
    assert [e.data["value"] for e in publisher.published] == [1]
    assert await _all_published(engine)


@pytest.mark.postgres_only
async def test_a_notification_during_a_batch_is_not_lost(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    a, b = await make_counters(uow_factory, 2)
    await bump(uow_factory, a)
    publisher = GatedPublisher()
    settings = RelaySettings(poll_interval=30, pipelines=1)
    relay = OutboxRelay(engine, publisher, settings=settings)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(publisher.entered.wait(), 5)
        await bump(uow_factory, b)  # committed (and notified) after the batch's claim
        publisher.gate.set()
        await _until(lambda: len(publisher.published) == 2, 5.0)  # far below poll_interval
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
    assert [e.data["counter_id"] for e in publisher.published] == [str(a), str(b)]


@pytest.mark.postgres_only
@pytest.mark.parametrize("ready", [True, False], ids=["ready", "due"])
async def test_claim_reads_its_partial_index_and_probes_the_aggregate_index(
    engine: AsyncEngine, ready: bool
) -> None:
    # A fresh outbox has no statistics; each candidate's "nearest earlier unpublished row"
    # must still be an index probe, and candidates must come from the state's own partial
    # index in order (no sort of the backlog, no scan of the table).
    stmt = PostgresRelaySql(engine.dialect).candidate_statement(due=not ready)
    params = {"lanes": list(range(0, 64, 2)), "batch": 200, "now": utcnow(), "skip": [1, 2]}

    def explain(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> Any:
        return "EXPLAIN " + statement, parameters

    event.listen(engine.sync_engine, "before_cursor_execute", explain, retval=True)
    try:
        async with engine.connect() as conn:
            plan = "\n".join(r[0] for r in await conn.execute(stmt, params))
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", explain)
    assert "Seq Scan" not in plan and "Sort" not in plan, plan
    index = "ix_qx_outbox_ready" if ready else "ix_qx_outbox_deferred"
    assert index in plan and "ix_qx_outbox_aggregate_open" in plan, plan
