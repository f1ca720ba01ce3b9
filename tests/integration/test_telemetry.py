"""OpenTelemetry from the user's side: one trace runs from an HTTP request through the bus,
the commit, the outbox relay and the broker to the consumer's inbox, with the database and
messaging attributes a tracing backend groups by. The SDK's in-memory exporter holds what
an application's exporter would have sent."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import Column, String, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import AggregateRoot, IntegrationEvent, new_id
from qx.cqrs import Command, MessageBus
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    uuid_pk,
    version_column,
)
from qx.errors import ConcurrencyConflict
from qx.outbox import Envelope, EventRouter, Inbox, OutboxRelay, outbox_table
from qx.testing import MemoryPublisher
from tests.integration.conftest import drop_schema, engine_with_tables

ROOT = Path(__file__).resolve().parents[2]
md = make_metadata()
reg = make_registry(md)


@dataclass(frozen=True, kw_only=True)
class TicketOpened(IntegrationEvent):
    name: ClassVar[str] = "helpdesk.ticket_opened"
    ticket_id: str
    title: str


@dataclass(eq=False, kw_only=True)
class Ticket(AggregateRoot):
    title: str
    id: UUID = field(default_factory=new_id)
    version: int = 1

    @classmethod
    def open(cls, title: str) -> Ticket:
        ticket = cls(title=title)
        ticket.record(TicketOpened(ticket_id=str(ticket.id), title=title))
        return ticket


map_aggregate(
    reg,
    Ticket,
    Table(
        "t_tickets", md, uuid_pk(), Column("title", String(100), nullable=False), version_column()
    ),
)


class Helpdesk(UnitOfWork):
    tickets: Repository[Ticket]


@dataclass(frozen=True, kw_only=True)
class OpenTicket(Command[UUID]):
    title: str


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider exporting to memory, as an application would set one up.

    The API lets a process set its provider once; OpenTelemetry's own test utilities reset
    these two globals between tests, and so does this fixture (other tests run untraced).
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_tracing()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_tracing()


def _reset_tracing() -> None:
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


@pytest.fixture
async def helpdesk(backend: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine with qx's tables and the helpdesk's."""
    engine, schema = await engine_with_tables(backend, tmp_path, md)
    try:
        yield engine
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_schema(schema)


def build(engine: AsyncEngine, *, races: int = 0) -> tuple[MessageBus, UnitOfWorkFactory[Helpdesk]]:
    """The helpdesk's bus; its handler loses ``races`` races before it succeeds."""
    bus = MessageBus()
    factory = UnitOfWorkFactory(Helpdesk, create_session_factory(engine), dispatcher=bus)
    bus.provide(uow_factory=factory)
    failures = {"left": races}

    @bus.handler(OpenTicket)
    async def open_ticket(command: OpenTicket, uow: Helpdesk) -> UUID:
        if failures["left"]:
            failures["left"] -= 1
            raise ConcurrencyConflict("a race, as another request would cause")
        ticket = Ticket.open(command.title)
        await uow.tickets.add(ticket)
        return ticket.id

    return bus, factory


def by_name(finished: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name.startswith(prefix)]


async def test_one_trace_from_the_http_request_to_the_consumer(
    spans: InMemorySpanExporter, helpdesk: AsyncEngine
) -> None:
    engine = helpdesk
    bus, factory = build(engine, races=1)
    tracer = trace.get_tracer("helpdesk-api")
    # What an HTTP framework's instrumentation does: continue the caller's traceparent in
    # a SERVER span around the request.
    caller = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    with tracer.start_as_current_span(
        "POST /tickets", context=propagate.extract(caller), kind=SpanKind.SERVER
    ):
        ticket_id = await bus.execute(OpenTicket(title="printer on fire"))

    publisher = MemoryPublisher()
    relay = OutboxRelay(engine, publisher, source="helpdesk")
    assert (await relay.run_once()).published == 1
    (sent,) = publisher.published
    # The consumer gets the bytes on the wire; its inbox continues the trace.
    received = Envelope.from_json(sent.to_json())
    consumed: list[str] = []
    router = EventRouter()

    @router.on("helpdesk.ticket_opened")
    async def on_opened(envelope: Envelope, uow: Any) -> None:
        consumed.append(envelope.data["ticket_id"])

    assert await Inbox(factory, consumer="notifier").process(received, router.dispatch)
    assert not await Inbox(factory, consumer="notifier").process(received, router.dispatch)
    assert consumed == [str(ticket_id)]

    finished = spans.get_finished_spans()
    (server,) = by_name(finished, "POST /tickets")
    (command,) = by_name(finished, "qx.bus.command OpenTicket")
    commits = by_name(finished, "qx.uow.commit")
    (send,) = by_name(finished, "send ")
    processes = by_name(finished, "process helpdesk.ticket_opened")
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    # One trace from the caller to the consumer: request, command, commit, send, process.
    for span in (server, command, *commits, send, *processes):
        assert span.context.trace_id == trace_id, span.name
    assert server.parent is not None and server.parent.span_id == 0x00F067AA0BA902B7
    assert command.parent is not None and command.parent.span_id == server.context.span_id
    # The race was retried: an event on the command span, and the attempts it took.
    assert command.attributes["qx.bus.attempts"] == 2
    assert [event.name for event in command.events] == ["qx.bus.retry"]
    assert command.events[0].attributes["exception.type"] == "ConcurrencyConflict"
    (committed,) = [c for c in commits if c.parent and c.parent.span_id == command.context.span_id]
    assert committed.attributes["qx.uow.events"] == 1
    assert committed.attributes["qx.outbox.rows"] == 1
    assert committed.attributes["db.system.name"] == engine.dialect.name
    # The in-process dispatch of each recorded event is a span inside the commit.
    (handled,) = by_name(finished, "qx.event.handle TicketOpened")
    assert handled.parent is not None and handled.parent.span_id == committed.context.span_id
    # The relay's send span is a PRODUCER child of the commit that wrote the row.
    assert send.kind is SpanKind.PRODUCER and send.parent is not None
    assert send.parent.span_id == committed.context.span_id
    assert send.attributes["messaging.system"] == "memory"
    assert send.attributes["messaging.destination.name"] == "helpdesk.ticket_opened"
    assert send.attributes["messaging.message.id"] == str(sent.id)
    # The consumer's spans are CONSUMER children of the send span, from the wire headers.
    assert len(processes) == 2
    for process in processes:
        assert process.kind is SpanKind.CONSUMER and process.parent is not None
        assert process.parent.span_id == send.context.span_id
        assert process.attributes["messaging.consumer.group.name"] == "notifier"
        assert process.attributes["messaging.message.id"] == str(sent.id)
    assert [p.attributes.get("qx.inbox.duplicate", False) for p in processes] == [False, True]
    # The relay's batch span says what it did.
    (batch,) = by_name(finished, "qx.outbox.batch")
    assert batch.attributes["qx.outbox.claimed"] == 1
    assert batch.attributes["qx.outbox.published"] == 1
    # And the row in the database holds the commit's context, for any other relay.
    async with engine.connect() as conn:
        headers = (await conn.execute(select(outbox_table.c.headers))).scalar_one()
    stored = headers if isinstance(headers, dict) else json.loads(headers)
    assert stored["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert stored["traceparent"].split("-")[2] == f"{committed.context.span_id:016x}"


async def test_a_failed_commit_is_an_error_span_and_tracing_off_writes_the_request_s_context(
    spans: InMemorySpanExporter, helpdesk: AsyncEngine
) -> None:
    engine = helpdesk
    bus, factory = build(engine, races=50)
    with pytest.raises(ConcurrencyConflict):
        await bus.execute(OpenTicket(title="never"))
    (command,) = by_name(spans.get_finished_spans(), "qx.bus.command OpenTicket")
    assert command.status.status_code is trace.StatusCode.ERROR
    assert command.attributes["qx.bus.attempts"] == bus.retry.attempts
    assert len(command.events) == bus.retry.attempts - 1 + 1  # retries, then the exception
    # With no provider set, qx makes no spans and keeps the request's traceparent as is.
    _reset_tracing()
    from qx.core import request_context

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with request_context(traceparent=parent):
        async with factory() as uow:
            await uow.tickets.add(Ticket.open("untraced"))
            await uow.commit()
    async with engine.connect() as conn:
        rows = (await conn.execute(select(outbox_table.c.headers))).scalars().all()
    assert [r if isinstance(r, dict) else json.loads(r) for r in rows] == [{"traceparent": parent}]


async def test_a_nats_consumer_continues_the_trace(
    spans: InMemorySpanExporter, helpdesk: AsyncEngine, backend: str
) -> None:
    engine = helpdesk
    if backend != "postgresql":
        pytest.skip("one backend is enough for the broker's part")
    import nats

    from qx.outbox import NatsSubscriber
    from qx.outbox.publishers import NatsPublisher
    from qx.settings import BrokerSettings
    from tests.services import NATS, resolve

    url = resolve(NATS)
    tag = new_id().hex[-10:]
    settings = BrokerSettings(url=url, subject_prefix=f"qxo{tag}", stream=f"QXO{tag}")
    bus, factory = build(engine)
    with trace.get_tracer("helpdesk-api").start_as_current_span("POST /tickets"):
        await bus.execute(OpenTicket(title="over NATS"))
    publisher = NatsPublisher(settings)
    await publisher.connect()
    router = EventRouter()
    handled = asyncio.Event()

    @router.on("helpdesk.ticket_opened")
    async def on_opened(envelope: Envelope, uow: Any) -> None:
        handled.set()

    stop = asyncio.Event()
    subscriber = NatsSubscriber(settings, Inbox(factory, consumer="nats"), router, durable=tag)
    task = asyncio.create_task(subscriber.run(stop))
    try:
        assert (await OutboxRelay(engine, publisher, source="helpdesk").run_once()).published == 1
        await asyncio.wait_for(handled.wait(), 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await publisher.close()
        nc = await nats.connect(url)
        await nc.jetstream().delete_stream(settings.stream)
        await nc.close()
    finished = spans.get_finished_spans()
    (server,) = by_name(finished, "POST /tickets")
    (send,) = by_name(finished, "send ")
    (process,) = by_name(finished, "process ")
    assert send.attributes["messaging.system"] == "nats"
    assert send.attributes["messaging.destination.name"] == f"qxo{tag}.helpdesk.ticket_opened"
    assert {send.context.trace_id, process.context.trace_id} == {server.context.trace_id}
    assert process.parent is not None and process.parent.span_id == send.context.span_id


def _tree(finished: tuple[ReadableSpan, ...], trace_id: int) -> list[str]:
    """qx's spans of one trace as an indented tree (each under its nearest qx ancestor:
    the web framework's own spans, which vary by version, are left out), in start order."""
    ours = [s for s in finished if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in ours}

    def qx_parent(span: ReadableSpan) -> int | None:
        parent = span.parent.span_id if span.parent else None
        while parent in by_id and by_id[parent].instrumentation_scope.name != "qx":
            above = by_id[parent].parent
            parent = above.span_id if above else None
        return parent if parent in by_id else None

    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(ours, key=lambda s: s.start_time or 0):
        if span.instrumentation_scope.name == "qx":
            children.setdefault(qx_parent(span), []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            lines.append(f"{'    ' * depth}{span.name} {span.kind.name}")
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return lines


def _documented_trace() -> list[str]:
    """The observability page's trace, as ``_tree`` writes it: names and kinds, by depth."""
    text = (ROOT / "docs" / "how-to" / "observability.md").read_text(encoding="utf-8")
    block = text.split("<!-- trace: written by tests/integration/test_telemetry.py")[1]
    block = block.split("```text\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        found = re.match(r"^([│├└─ ]*)(\S.*?)\s{2,}([A-Z]+)\b", line)
        assert found is not None, line
        prefix, name, kind = found.groups()
        lines.append(f"{'    ' * (len(prefix) // 4)}{name} {kind}")
    return lines


async def test_the_documented_trace_of_one_order_from_http_to_consumer(
    spans: InMemorySpanExporter, engine: AsyncEngine
) -> None:
    import httpx

    from qx.examples.orders.api import create_app
    from qx.settings import QxSettings
    from tests.integration.conftest import CURSOR_SECRET

    app = create_app(settings=QxSettings(pagination_secret=CURSOR_SECRET), engine=engine)
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"X-Tenant-ID": "acme"}
        ) as http:
            stocked = await http.post(
                "/products",
                json={"sku": "KB-01", "name": "keyboard", "price": "49.90", "quantity": 5},
            )
            assert stocked.status_code == 201, stocked.text
            placed = await http.post(
                "/orders",
                json={"customer": "ada", "lines": [{"sku": "KB-01", "quantity": 1}]},
                headers={"traceparent": caller},
            )
            assert placed.status_code == 201, placed.text
    publisher = MemoryPublisher()
    relay = OutboxRelay(engine, publisher, source="orders")
    while (await relay.run_once()).claimed:
        pass
    factory = UnitOfWorkFactory(Helpdesk, create_session_factory(engine))
    inbox = Inbox(factory, consumer="shipping")
    router = EventRouter()
    seen: list[str] = []

    @router.on("orders.order_placed")
    async def on_placed(envelope: Envelope, uow: Any) -> None:
        seen.append(envelope.type)

    for envelope in publisher.published:
        await inbox.process(Envelope.from_json(envelope.to_json()), router.dispatch)
    assert seen == ["orders.order_placed"]
    tree = _tree(spans.get_finished_spans(), 0x4BF92F3577B34DA6A3CE929D0E0E4736)
    assert tree == _documented_trace(), "\n".join(tree)
