"""A consumer's handler that keeps failing parks its message, and its aggregate behind it.

A small ledger of counters fed numbered events. The handler fails on one event while the
service is "broken": the subscriber tries it again, and after the inbox's ``max_attempts``
the message is parked in the consumer's database with its error and acknowledged, so the
broker stops redelivering it. The aggregate's later events park behind it in order (also
acknowledged); other aggregates go on. Once fixed, ``requeue`` applies the parked events in
order and unparks the aggregate; later events flow as before.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from qx.cli import app
from qx.core import request_context
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.outbox import Envelope, EventRouter, Inbox, InboxMetrics, NatsSubscriber
from qx.settings import BrokerSettings, DatabaseSettings
from tests import models
from tests.integration.conftest import create_tables
from tests.integration.test_inbox_order import Settled, counters, numbered

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


class Ledger:
    def __init__(self) -> None:
        self.broken: set[tuple[str, int]] = set()
        self.router = EventRouter()

        @self.router.on("tests.counter_changed")
        async def apply(envelope: Envelope, uow: models.AppUnitOfWork) -> None:
            if (str(envelope.aggregate_id), envelope.sequence) in self.broken:
                raise RuntimeError(f"cannot apply event {envelope.sequence}")
            (await uow.counters.require(envelope.data["counter_id"])).increment()


async def value(factory: Factory, ident: UUID) -> int:
    with request_context(tenant_id="t-1"):
        async with factory() as uow:
            return (await uow.counters.require(ident)).value


async def test_a_failing_event_parks_its_aggregate_until_requeued(uow_factory: Factory) -> None:
    a, b = await counters(uow_factory, 2)
    ledger = Ledger()
    ledger.broken.add((str(a), 3))
    inbox = Inbox(uow_factory, consumer="parking", max_attempts=3)
    subscriber = NatsSubscriber(
        BrokerSettings(url="nats://127.0.0.1:1"), inbox, ledger.router, durable="unused"
    )
    subscriber.hold_seconds = 0.05
    broker = Settled()
    stop = asyncio.Event()
    pending: list[Envelope] = [numbered(a, n) for n in range(1, 6)]
    pending += [numbered(b, n) for n in (1, 2)]
    rounds = 0
    while pending:  # the broker delivers again what was given back
        rounds += 1
        assert rounds <= 5, broker.log
        broker.returned.clear()
        await subscriber._settle([broker.delivery(e) for e in pending], stop)
        pending = list(broker.returned)
    assert rounds == 3  # tried max_attempts times, then parked and acknowledged
    assert (await value(uow_factory, a), await value(uow_factory, b)) == (2, 2)
    parked = await inbox.parked()
    assert [(p.sequence, p.error is not None, p.attempts) for p in parked] == [
        (3, True, 3),
        (4, False, 0),
        (5, False, 0),
    ]
    assert parked[0].aggregate == f"Counter/{a}"
    assert "RuntimeError: cannot apply event 3" in (parked[0].error or "")
    # A later event of the parked aggregate parks too; the other aggregate goes on.
    assert not await inbox.process(numbered(a, 6), ledger.router.dispatch)
    assert await inbox.process(numbered(b, 3), ledger.router.dispatch)
    assert inbox.counts["dead"] == 1 and inbox.counts["parked"] == 3
    # What Prometheus scrapes: the same counts, read when scraped.
    registry = CollectorRegistry()
    InboxMetrics(inbox, registry=registry)
    scraped = generate_latest(registry).decode()
    assert 'qx_inbox_messages_total{consumer="parking",outcome="dead"} 1.0' in scraped
    assert 'qx_inbox_messages_total{consumer="parking",outcome="parked"} 3.0' in scraped
    assert 'qx_inbox_messages_total{consumer="parking",outcome="applied"} 5.0' in scraped
    # Still broken: the requeue stops at event 3 and everything stays parked.
    assert await inbox.requeue(ledger.router.dispatch) == 0
    again: Any = await inbox.parked()
    assert [p.sequence for p in again] == [3, 4, 5, 6] and again[0].attempts == 4
    # Fixed: requeued in order, unparked; the next event is applied as it comes.
    ledger.broken.clear()
    assert await inbox.requeue(ledger.router.dispatch) == 4
    assert await inbox.parked() == []
    assert await inbox.process(numbered(a, 7), ledger.router.dispatch)
    assert (await value(uow_factory, a), await value(uow_factory, b)) == (7, 3)


async def test_max_attempts_is_checked(uow_factory: Factory) -> None:
    from qx.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="max_attempts"):
        Inbox(uow_factory, consumer="x", max_attempts=0)


ROUTER = """
from qx.outbox import EventRouter

router = EventRouter()


@router.on("tests.counter_changed")
async def apply(envelope, uow):
    (await uow.counters.require(envelope.data["counter_id"])).increment()
"""


def test_qx_inbox_parked_and_requeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's view: list what is parked, then requeue it once the handler is fixed."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'consumer.sqlite3'}"
    monkeypatch.setenv("QX_DB__URL", url)
    (tmp_path / "fixed_consumers.py").write_text(ROUTER)
    monkeypatch.syspath_prepend(str(tmp_path))

    async def park() -> UUID:
        engine = create_engine(DatabaseSettings(url=url))
        try:
            await create_tables(engine)
            factory = UnitOfWorkFactory(models.AppUnitOfWork, create_session_factory(engine))
            (ident,) = await counters(factory, 1)
            inbox = Inbox(factory, consumer="billing", max_attempts=1)
            broken = numbered(ident, 1)
            assert await inbox.failed(broken, RuntimeError("the ledger is closed"))
            assert not await inbox.process(numbered(ident, 2), Ledger().router.dispatch)
            return ident
        finally:
            await engine.dispose()

    ident = asyncio.run(park())
    runner = CliRunner()
    listed = runner.invoke(app, ["inbox", "parked", "--consumer", "billing"])
    assert listed.exit_code == 0, listed.output
    assert f"Counter/{ident} #1: RuntimeError: the ledger is closed" in listed.output
    assert f"Counter/{ident} #2: behind its aggregate's parked message" in listed.output
    assert "2 parked" in listed.output
    requeued = runner.invoke(
        app,
        [
            "inbox", "requeue", "--consumer", "billing",
            "--router", "fixed_consumers:router", "--uow", "tests.models:AppUnitOfWork",
        ],
    )  # fmt: skip
    assert requeued.exit_code == 0, requeued.output
    assert "2 requeued, 0 still parked" in requeued.output

    async def final() -> int:
        engine = create_engine(DatabaseSettings(url=url))
        try:
            factory = UnitOfWorkFactory(models.AppUnitOfWork, create_session_factory(engine))
            return await value(factory, ident)
        finally:
            await engine.dispose()

    assert asyncio.run(final()) == 2
