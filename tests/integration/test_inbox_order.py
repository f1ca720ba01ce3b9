"""The inbox applies an aggregate's events in the relay's order, whichever consumer gets them.

A handler here keeps no guard of its own: it appends each event's number to the aggregate's
log. The inbox refuses an event whose predecessor is not applied yet (``OutOfOrder``, nothing
done), skips a number already applied (a duplicate, even under a new message id), and
applies an event whose predecessor never comes once it has waited ``gap_seconds`` (since the
inbox first saw it, not since it occurred). Three
NATS subscribers of one durable consumer, fed events in order, apply every aggregate's
events in order.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from uuid import UUID

import pytest

from qx.core import new_id, request_context, utcnow
from qx.core._backoff import Backoff
from qx.db import UnitOfWorkFactory
from qx.errors import OutOfOrder
from qx.outbox import Envelope, EventRouter, Inbox, NatsSubscriber
from qx.outbox._subscribers import Delivery
from qx.outbox.publishers import publisher_from_settings
from qx.settings import BrokerSettings
from tests import models
from tests.integration.helpers import drop_stream
from tests.services import NATS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


def numbered(counter: UUID, sequence: int, *, age: float = 0.0) -> Envelope:
    return Envelope(
        id=new_id(),
        type="tests.counter_changed",
        version=1,
        time=utcnow() - timedelta(seconds=age),
        source="other-service",
        data={"counter_id": str(counter), "value": sequence},
        aggregate_type="Counter",
        aggregate_id=str(counter),
        tenant_id="t-1",
        sequence=sequence,
    )


def logging_router() -> tuple[EventRouter, dict[str, list[int]]]:
    router = EventRouter()
    applied: dict[str, list[int]] = {}
    # Per aggregate: the counter's value each applying transaction wrote -> the event's
    # number. The values order the commits (each increment is guarded by the counter's
    # version); two subscribers' after-commit hooks may run in either order.
    by_value: dict[str, dict[int, int]] = {}

    @router.on("tests.counter_changed")
    async def apply(envelope: Envelope, uow: models.AppUnitOfWork) -> None:
        counter = await uow.counters.require(envelope.data["counter_id"])
        counter.increment()
        # After the commit only: what the database holds, not what a rolled-back try saw.
        aggregate, number = str(envelope.aggregate_id), int(envelope.sequence or 0)
        value = counter.value

        def committed() -> None:
            numbers = by_value.setdefault(aggregate, {})
            numbers[value] = number
            applied[aggregate] = [numbers[v] for v in sorted(numbers)]

        uow.on_commit(committed)

    return router, applied


async def counters(factory: Factory, count: int) -> list[UUID]:
    with request_context(tenant_id="t-1"):
        async with factory() as uow:
            made = [models.Counter(name=f"o{i}") for i in range(count)]
            await uow.counters.add_many(made)
            await uow.commit()
    return [c.id for c in made]


async def test_out_of_order_duplicate_and_gap(uow_factory: Factory) -> None:
    (ident,) = await counters(uow_factory, 1)
    router, applied = logging_router()
    now = [0.0]
    inbox = Inbox(uow_factory, consumer="ordered", gap_seconds=30, monotonic=lambda: now[0])
    assert await inbox.process(numbered(ident, 1), router.dispatch)
    with pytest.raises(OutOfOrder) as caught:
        await inbox.process(numbered(ident, 3), router.dispatch)
    assert (caught.value.expected, caught.value.got) == (2, 3)
    assert await inbox.process(numbered(ident, 2), router.dispatch)
    assert await inbox.process(numbered(ident, 3), router.dispatch)
    # The same number again under another message id: a duplicate, nothing applied.
    assert not await inbox.process(numbered(ident, 2), router.dispatch)
    # Number 4 never comes (a dead event the relay published past): 5 waits, then goes.
    # The wait counts from when the inbox first saw 5, not from when 5 occurred: a backlog
    # an hour old is not a gap.
    with pytest.raises(OutOfOrder):
        await inbox.process(numbered(ident, 5, age=3600), router.dispatch)
    now[0] += 29
    with pytest.raises(OutOfOrder):
        await inbox.process(numbered(ident, 5, age=3600), router.dispatch)
    now[0] += 2
    assert await inbox.process(numbered(ident, 5, age=3600), router.dispatch)
    assert applied == {str(ident): [1, 2, 3, 5]}
    assert inbox.counts == {"applied": 4, "duplicate": 1, "out_of_order": 3, "gap": 1}
    # Another consumer keeps its own place in the sequence.
    other = Inbox(uow_factory, consumer="other")
    assert await other.process(numbered(ident, 1), router.dispatch)
    with request_context(tenant_id="t-1"):
        async with uow_factory() as uow:
            assert (await uow.counters.require(ident)).value == 5


class Settled:
    """Deliveries of a fake broker, and what the subscriber did with each."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.returned: list[Envelope] = []  # given back: the broker delivers them again

    def delivery(self, envelope: Envelope) -> Delivery:
        number = int(envelope.sequence or 0)

        async def ack() -> None:
            self.log.append(("ack", number))

        async def again(_backoff: Backoff) -> None:
            self.log.append(("again", number))
            self.returned.append(envelope)

        return Delivery(envelope.to_json(), ack, again)


async def test_what_arrives_together_is_applied_in_each_aggregates_order(
    uow_factory: Factory,
) -> None:
    """A batch holding two aggregates' events backwards (as redeliveries come) is applied
    in one pass, each aggregate in its order; an event whose predecessor never comes goes
    back to the broker after the hold, with the events behind it."""
    first, second = await counters(uow_factory, 2)
    router, applied = logging_router()
    inbox = Inbox(uow_factory, consumer="batched")
    subscriber = NatsSubscriber(
        BrokerSettings(url="nats://127.0.0.1:1"), inbox, router, durable="unused"
    )
    subscriber.hold_seconds = 0.2
    broker = Settled()
    batch = [numbered(first, n) for n in (3, 2, 1)] + [numbered(second, n) for n in (2, 1)]
    await subscriber._settle([broker.delivery(e) for e in batch], asyncio.Event())
    assert applied == {str(first): [1, 2, 3], str(second): [1, 2]}
    assert sorted(broker.log) == [("ack", 1), ("ack", 1), ("ack", 2), ("ack", 2), ("ack", 3)]
    # 5 and 6 wait for 4, which is not coming: back to the broker, 6 without a second hold.
    broker.log.clear()
    started = time.monotonic()
    await subscriber._settle([broker.delivery(numbered(first, n)) for n in (6, 5)], asyncio.Event())
    assert broker.log == [("again", 5), ("again", 6)]
    assert time.monotonic() - started < 5 * subscriber.hold_seconds
    assert applied[str(first)] == [1, 2, 3]


@pytest.mark.postgres_only
@pytest.mark.timeout(120)
async def test_three_subscribers_apply_every_aggregate_in_order(uow_factory: Factory) -> None:
    url = resolve(NATS)
    tag = new_id().hex[-10:]
    settings = BrokerSettings(url=url, subject_prefix=f"qxord{tag}", stream=f"QXORD{tag}")
    idents = await counters(uow_factory, 8)
    router, applied = logging_router()
    inbox = Inbox(uow_factory, consumer=f"ordered-{tag}")
    publisher = publisher_from_settings(settings)
    await publisher.connect()
    stop = asyncio.Event()
    subscribers = [
        NatsSubscriber(settings, inbox, router, durable=f"d{tag}", batch=5) for _ in range(3)
    ]
    tasks = [asyncio.create_task(s.run(stop)) for s in subscribers]
    events = 12
    try:
        for number in range(1, events + 1):
            await asyncio.gather(*(publisher.publish(numbered(i, number)) for i in idents))
        deadline = time.monotonic() + 90

        def done() -> bool:
            return sum(len(v) for v in applied.values()) >= events * len(idents)

        while not done() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await publisher.close()
        await drop_stream(url, settings.stream)
    expected = list(range(1, events + 1))
    assert {k: v for k, v in applied.items() if v != expected} == {}
    assert len(applied) == len(idents)
    with request_context(tenant_id="t-1"):
        async with uow_factory() as uow:
            values = [(await uow.counters.require(i)).value for i in idents]
    assert values == [events] * len(idents)  # each effect once
    assert inbox.counts["applied"] == events * len(idents)
