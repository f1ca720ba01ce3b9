"""A commit that is one statement goes without BEGIN and COMMIT, and its lost answer is
still found out (PostgreSQL, through a TCP proxy).

A unit of work that only creates aggregates and records integration events writes all its
rows in one statement; qx sends it as a transaction of its own (one round trip instead of
three). A unit of work whose first statement is a read (a load by key, a query that locks
nothing), with nothing to write yet, sends that read on its own as well (no BEGIN, so no
ROLLBACK at its close). If the connection dies around it, nobody can ask about a transaction id that never
came back: qx asks instead for the outbox row the statement wrote (its key is the new
event's id), once the server session that ran the statement is gone - ended by the probe
if it still runs, so that a statement still waiting on a lock cannot commit after the probe
said it did not. A small ticket domain of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, ForeignKey, String, Table, Uuid, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, IntegrationEvent, new_id
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_engine,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    uuid_pk,
    version_column,
)
from qx.errors import CommitOutcomeUnknown, TransientError
from qx.outbox import OutboxStage, outbox_table
from qx.settings import DatabaseSettings
from tests.integration.conftest import drop_schema, engine_with_tables
from tests.integration.proxy import Proxy

metadata = make_metadata()
registry = make_registry(metadata)


@pytest.fixture
def backend() -> str:
    return "postgresql"


@dataclass(frozen=True, kw_only=True)
class TicketOpened(IntegrationEvent):
    name = "desk.ticket_opened"
    version = 1
    ticket_id: UUID
    title: str


@dataclass(eq=False, kw_only=True)
class Note:
    id: UUID = field(default_factory=new_id)
    text: str


@dataclass(eq=False, kw_only=True)
class Ticket(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    title: str
    notes: list[Note] = field(default_factory=list)
    version: int = 1

    @classmethod
    def open(cls, title: str, *notes: str) -> Ticket:
        ticket = cls(title=title, notes=[Note(text=n) for n in notes])
        ticket.record(TicketOpened(ticket_id=ticket.id, title=title))
        return ticket


tickets = Table(
    "ca_tickets", metadata, uuid_pk(), Column("title", String(60), nullable=False), version_column()
)
notes = Table(
    "ca_notes",
    metadata,
    uuid_pk(),
    Column("ticket_id", Uuid(), ForeignKey("ca_tickets.id"), nullable=False),
    Column("text", String(60), nullable=False),
)
map_entity(registry, Note, notes)
map_aggregate(
    registry,
    Ticket,
    tickets,
    properties={"notes": relationship(Note, cascade="all, delete-orphan", lazy="selectin")},
)


class Tickets(Repository[Ticket]):
    filterable = frozenset({"title"})
    sortable = frozenset({"title"})


class DeskUnitOfWork(UnitOfWork):
    tickets: Tickets


@dataclass
class Desk:
    proxy: Proxy
    factory: UnitOfWorkFactory[DeskUnitOfWork]
    proxied: AsyncEngine  # through the proxy
    engine: AsyncEngine  # direct
    search_path: str


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    engine, schema = await engine_with_tables("postgresql", tmp_path, metadata)
    assert schema is not None
    url = make_url(str(engine.url))
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = create_engine(
        DatabaseSettings(
            url=url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            search_path=schema,
        )
    )
    # No relay wake-up: its NOTIFY goes in a transaction of its own, on another connection.
    factory = UnitOfWorkFactory(
        DeskUnitOfWork,
        create_session_factory(proxied),
        commit_probe_timeout=5.0,
        stages=[OutboxStage(wake_relays=False)],
    )
    try:
        yield Desk(proxy, factory, proxied, engine, schema)
    finally:
        await proxied.dispose()
        await proxy.stop()
        await engine.dispose()
        await drop_schema(schema)


def repeatable_read(desk: Desk) -> UnitOfWorkFactory[DeskUnitOfWork]:
    """Units of work on the desk's proxied engine at REPEATABLE READ."""
    return UnitOfWorkFactory(
        DeskUnitOfWork,
        create_session_factory(desk.proxied.execution_options(isolation_level="REPEATABLE READ")),
        stages=[OutboxStage(wake_relays=False)],
    )


async def stored(engine: AsyncEngine, title: str) -> tuple[int, int, list[UUID]]:
    """Tickets titled ``title``, their notes, and the outbox rows' event ids for them."""
    async with engine.connect() as conn:
        ids = (await conn.scalars(select(tickets.c.id).where(tickets.c.title == title))).all()
        count_notes = await conn.scalar(select(func.count()).where(notes.c.ticket_id.in_(ids)))
        events = (
            await conn.scalars(
                select(outbox_table.c.id).where(
                    outbox_table.c.aggregate_id.in_([str(i) for i in ids])
                )
            )
        ).all()
    return len(ids), int(count_notes or 0), list(events)


async def open_ticket(factory: UnitOfWorkFactory[DeskUnitOfWork], ticket: Ticket) -> Any:
    async with factory() as uow:
        await uow.tickets.add(ticket)
        await uow.commit()
        return uow.events


async def test_new_aggregates_and_their_events_commit_as_one_statement(desk: Desk) -> None:
    await open_ticket(desk.factory, Ticket.open("warm-up"))  # the connection's own setup
    desk.proxy.sent.clear()
    ticket = Ticket.open("printer on fire", "smoke", "flames")
    events = await open_ticket(desk.factory, ticket)
    assert b"BEGIN" not in desk.proxy.sent and b"COMMIT" not in desk.proxy.sent
    assert [type(e) for e in events] == [TicketOpened]
    count, count_notes, outbox = await stored(desk.engine, "printer on fire")
    assert (count, count_notes) == (1, 2)
    assert outbox == [events[0].event_id]


async def test_a_unit_that_read_first_or_asked_for_an_isolation_level_keeps_its_transaction(
    desk: Desk,
) -> None:
    await open_ticket(desk.factory, Ticket.open("warm-up"))
    desk.proxy.sent.clear()
    async with desk.factory() as uow:
        assert await uow.tickets.count() == 1  # a statement ran: the transaction began
        await uow.tickets.add(Ticket.open("after a read"))
        await uow.commit()
    assert b"BEGIN" in desk.proxy.sent and b"COMMIT" in desk.proxy.sent
    assert (await stored(desk.engine, "after a read"))[0] == 1

    # A statement on its own would run at the server's default level, not the one asked.
    repeatable = repeatable_read(desk)
    desk.proxy.sent.clear()
    await open_ticket(repeatable, Ticket.open("repeatable"))
    assert b"ISOLATION LEVEL REPEATABLE READ" in desk.proxy.sent
    assert b"COMMIT" in desk.proxy.sent
    assert (await stored(desk.engine, "repeatable"))[0] == 1

    # Turned off (a pooler in transaction mode): a transaction, as before.
    pooled = create_engine(
        DatabaseSettings(
            url=desk.proxied.url.render_as_string(hide_password=False),
            search_path=desk.search_path,
            single_statement_commits=False,
        )
    )
    try:
        desk.proxy.sent.clear()
        await open_ticket(
            UnitOfWorkFactory(
                DeskUnitOfWork,
                create_session_factory(pooled),
                stages=[OutboxStage(wake_relays=False)],
            ),
            Ticket.open("pooled"),
        )
        assert b"BEGIN" in desk.proxy.sent and b"COMMIT" in desk.proxy.sent
        assert (await stored(desk.engine, "pooled"))[0] == 1
    finally:
        await pooled.dispose()

    # Without an integration event no row has a key made for it: nothing to ask about
    # after a lost answer, so the rows go in a transaction (whose id the probe can ask).
    desk.proxy.sent.clear()
    await open_ticket(desk.factory, Ticket(title="no event"))
    assert b"BEGIN" in desk.proxy.sent and b"COMMIT" in desk.proxy.sent


async def test_a_unit_that_only_gets_by_key_reads_without_begin(desk: Desk) -> None:
    """Its first statement is a read with nothing to write: it goes on its own (no BEGIN,
    and no ROLLBACK at the close), its parts' load too; the aggregate is whole."""
    ticket = Ticket.open("read me", "first", "second")
    await open_ticket(desk.factory, ticket)
    desk.proxy.sent.clear()
    async with desk.factory() as uow:
        found = await uow.tickets.require(ticket.id)
        assert (found.title, sorted(n.text for n in found.notes)) == (
            "read me",
            ["first", "second"],
        )
        assert await uow.tickets.get(ticket.id) is found  # the identity map: no statement
    assert desk.proxy.sent, "the read went through the proxy"
    assert b"BEGIN" not in desk.proxy.sent and b"ROLLBACK" not in desk.proxy.sent


async def test_a_unit_that_only_queries_reads_without_begin_unless_it_locks(desk: Desk) -> None:
    """A query as the first statement goes on its own too (its parts' load as well); one
    that locks its rows (``for_update``) needs the transaction the locks last for."""
    await open_ticket(desk.factory, Ticket.open("listed", "a", "b"))
    await open_ticket(desk.factory, Ticket.open("listed too", "c"))
    desk.proxy.sent.clear()
    async with desk.factory() as uow:
        found = await uow.tickets.query().order_by("title").all()
        assert [(t.title, len(t.notes)) for t in found] == [("listed", 2), ("listed too", 1)]
    assert b"BEGIN" not in desk.proxy.sent and b"ROLLBACK" not in desk.proxy.sent

    desk.proxy.sent.clear()
    async with desk.factory() as uow:
        locked = await uow.tickets.query().filter(title="listed").for_update().all()
        assert [t.title for t in locked] == ["listed"]
    assert b"BEGIN" in desk.proxy.sent and b"FOR UPDATE" in desk.proxy.sent


async def test_what_follows_a_read_alone_is_in_the_transaction(desk: Desk) -> None:
    """After the read on its own, the next statement begins the transaction: a change
    commits once, with its version checked; one not committed is rolled back."""
    ticket = Ticket.open("before", "a note")
    await open_ticket(desk.factory, ticket)
    desk.proxy.sent.clear()
    async with desk.factory() as uow:
        found = await uow.tickets.require(ticket.id)
        found.title = "after"
        await uow.commit()
    assert b"BEGIN" in desk.proxy.sent and b"COMMIT" in desk.proxy.sent
    async with desk.engine.connect() as conn:
        row = (await conn.execute(select(tickets.c.title, tickets.c.version))).one()
    assert tuple(row) == ("after", 2)

    async with desk.factory() as uow:
        await uow.tickets.require(ticket.id)
        await uow.session.execute(text("UPDATE ca_tickets SET title = 'never committed'"))
        # left without commit(): rolled back
    assert (await stored(desk.engine, "after"))[0] == 1
    assert (await stored(desk.engine, "never committed"))[0] == 0


async def test_a_get_with_changes_pending_or_an_isolation_level_stays_in_the_transaction(
    desk: Desk,
) -> None:
    """An autoflush before the read would send the changes: they must not go outside the
    transaction (and commit on their own). A connection that asked for an isolation level
    reads at that level, in its transaction."""
    ticket = Ticket.open("kept")
    await open_ticket(desk.factory, ticket)
    desk.proxy.sent.clear()
    async with desk.factory() as uow:
        await uow.tickets.add(Ticket.open("pending, then abandoned"))
        assert await uow.tickets.get(ticket.id) is not None
        # left without commit(): the new ticket must not be stored
    assert b"BEGIN" in desk.proxy.sent
    assert (await stored(desk.engine, "pending, then abandoned")) == (0, 0, [])
    async with desk.factory() as uow:
        added = Ticket(title="read back, then abandoned")
        await uow.tickets.add(added)
        # Reading the new ticket by its key flushes it first (the read must see it).
        assert await uow.tickets.get(added.id) is added
    assert (await stored(desk.engine, "read back, then abandoned"))[0] == 0

    repeatable = repeatable_read(desk)
    desk.proxy.sent.clear()
    async with repeatable() as uow:
        assert await uow.tickets.get(ticket.id) is not None
    assert b"ISOLATION LEVEL REPEATABLE READ" in desk.proxy.sent


@pytest.mark.timeout(60)
async def test_a_lost_answer_is_found_committed_and_the_commit_returns(desk: Desk) -> None:
    # The title travels in the statement's parameters (the statement itself was prepared
    # on the connection before): the cut falls on its execution.
    ticket = Ticket.open("lost answer 1", "a note")
    desk.proxy.cut_at(b"lost answer 1")
    events = await open_ticket(desk.factory, ticket)
    assert desk.proxy.cuts == 1
    assert [type(e) for e in events] == [TicketOpened]
    count, count_notes, outbox = await stored(desk.engine, "lost answer 1")
    assert (count, count_notes, outbox) == (1, 1, [events[0].event_id])
    # The factory goes on over fresh connections.
    await open_ticket(desk.factory, Ticket.open("after the cut"))
    assert (await stored(desk.engine, "after the cut"))[0] == 1


@pytest.mark.timeout(60)
async def test_a_statement_lost_on_its_way_did_not_commit_and_is_retried_once(
    desk: Desk,
) -> None:
    ticket = Ticket.open("lost statement", "a note")
    desk.proxy.cut_at(b"lost statement", deliver=False)
    with pytest.raises(TransientError, match="did not commit; safe to retry"):
        await open_ticket(desk.factory, ticket)
    assert await stored(desk.engine, "lost statement") == (0, 0, [])
    # The same objects again (their events were given back): written once.
    events = await open_ticket(desk.factory, ticket)
    count, count_notes, outbox = await stored(desk.engine, "lost statement")
    assert (count, count_notes, outbox) == (1, 1, [events[0].event_id])


@pytest.mark.timeout(60)
async def test_a_statement_still_waiting_when_the_client_died_is_ended_not_left_to_commit(
    desk: Desk,
) -> None:
    # Another transaction holds the outbox table: the statement waits on its lock when the
    # client's end of the connection dies, and the server session lives on. Were the probe
    # only to look for the row, it would find none and call it safe to retry - and the
    # waiting statement would commit as soon as the lock went, beside the retry.
    # Prepared on the connection first (parsing an INSERT waits on that lock too): the
    # statement that waits is the execution, whose parameters hold the title.
    await open_ticket(desk.factory, Ticket.open("warm-up", "a note"))
    ticket = Ticket.open("waiting statement", "a note")
    async with desk.engine.connect() as holder:
        await holder.execute(text(f"LOCK TABLE {outbox_table.name} IN SHARE MODE"))
        desk.proxy.cut_at(b"waiting statement", hold_server=True)
        with pytest.raises(TransientError, match="did not commit; safe to retry"):
            await open_ticket(desk.factory, ticket)
        await holder.rollback()
    assert desk.proxy.cuts == 1
    assert await stored(desk.engine, "waiting statement") == (0, 0, [])
    events = await open_ticket(desk.factory, ticket)
    count, count_notes, outbox = await stored(desk.engine, "waiting statement")
    assert (count, count_notes, outbox) == (1, 1, [events[0].event_id])


@pytest.mark.timeout(60)
async def test_a_lost_answer_nobody_can_be_asked_about_is_unknown_and_names_its_row(
    desk: Desk,
) -> None:
    ticket = Ticket.open("nobody to ask")
    desk.proxy.cut_at(b"nobody to ask", refuse=True)
    with pytest.raises(CommitOutcomeUnknown, match=r"qx_outbox\(") as caught:
        await open_ticket(desk.factory, ticket)
    assert "one-statement transaction" in str(caught.value)
    assert len(str(caught.value)) < 400
    assert (await stored(desk.engine, "nobody to ask"))[:2] == (1, 0)  # it had committed
