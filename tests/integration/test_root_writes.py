"""A changed aggregate's rows, as an application changes them, on every backend.

Any change inside an aggregate writes its root's row once per transaction: the version grows
and ``updated_at`` moves, guarded by the version that was loaded; a changed part writes its
own row. qx writes such rows itself when the flush would add nothing to them (plain columns
changed), in UPDATEs built once (the first also names the transaction on PostgreSQL), and a
row with nothing else changed leaves the flush altogether; otherwise the flush writes it (a
many-to-one link changed, update listeners, a column SQLAlchemy fills in, a SQL expression).
Either way the database must end up with the same rows, the check must refuse a stale
aggregate, nothing of a refused unit of work may be written, flush listeners must see every
row, and a savepoint rolled back must leave no written value in memory. A small domain of
its own: boards owning cards, with an owner; a root with an update listener; a root with a
column filled in on update.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, ForeignKey, String, Table, Uuid, event, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, new_id
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    audit_columns,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    uuid_pk,
    version_column,
)
from qx.errors import ConcurrencyConflict
from tests.integration.conftest import own_domain
from tests.integration.test_query import statements

boards_metadata = make_metadata()
registry = make_registry(boards_metadata)


@dataclass(eq=False, kw_only=True)
class Owner:
    id: UUID = field(default_factory=new_id)
    name: str


@dataclass(eq=False, kw_only=True)
class Card:
    id: UUID = field(default_factory=new_id)
    title: str


@dataclass(eq=False, kw_only=True)
class Board(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    owner: Owner | None = None
    cards: list[Card] = field(default_factory=list)
    version: int = 1
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(eq=False, kw_only=True)
class Watched(AggregateRoot):
    """A root whose mapper has update listeners: they must see its UPDATE."""

    id: UUID = field(default_factory=new_id)
    label: str
    version: int = 1


@dataclass(eq=False, kw_only=True)
class Stamped(AggregateRoot):
    """A root with a column SQLAlchemy fills in on every UPDATE that leaves it out."""

    id: UUID = field(default_factory=new_id)
    label: str
    touched: str | None = None
    version: int = 1


owners = Table("rw_owners", boards_metadata, uuid_pk(), Column("name", String(20)))
boards = Table(
    "rw_boards",
    boards_metadata,
    uuid_pk(),
    Column("name", String(40), nullable=False),
    Column("owner_id", Uuid(), ForeignKey("rw_owners.id"), nullable=True),
    version_column(),
    *audit_columns(),
)
cards = Table(
    "rw_cards",
    boards_metadata,
    uuid_pk(),
    Column("board_id", Uuid(), ForeignKey("rw_boards.id"), nullable=False),
    Column("title", String(40), nullable=False),
)
watched = Table(
    "rw_watched", boards_metadata, uuid_pk(), Column("label", String(20)), version_column()
)
stamped = Table(
    "rw_stamped",
    boards_metadata,
    uuid_pk(),
    Column("label", String(20)),
    Column("touched", String(20), onupdate="by update"),
    version_column(),
)
map_entity(registry, Owner, owners)
map_entity(registry, Card, cards)
map_aggregate(
    registry,
    Board,
    boards,
    properties={
        "owner": relationship(Owner),
        "cards": relationship(Card, cascade="all, delete-orphan", order_by=cards.c.title),
    },
)
map_aggregate(registry, Watched, watched)
map_aggregate(registry, Stamped, stamped)

#: labels of the Watched rows whose UPDATE the listener saw
updates_seen: list[str] = []


@event.listens_for(Watched, "before_update")
def _saw_update(_mapper: Any, _connection: Any, target: Watched) -> None:
    updates_seen.append(target.label)


class Boards(Repository[Board]):
    pass


class WatchedRepository(Repository[Watched]):
    pass


class StampedRepository(Repository[Stamped]):
    pass


class BoardsUnitOfWork(UnitOfWork):
    boards: Boards
    watched: WatchedRepository
    stamped: StampedRepository


Domain = tuple[UnitOfWorkFactory[BoardsUnitOfWork], AsyncEngine]


@pytest.fixture
async def domain(backend: str, tmp_path: Any) -> AsyncIterator[Domain]:
    async with own_domain(backend, tmp_path, BoardsUnitOfWork, boards_metadata) as made:
        yield made


async def _board(domain: Domain) -> Board:
    factory, _ = domain
    async with factory() as uow:
        board = Board(
            name="plans", owner=Owner(name="ann"), cards=[Card(title="a"), Card(title="b")]
        )
        await uow.boards.add(board)
        await uow.commit()
    return board


async def _row(engine: AsyncEngine, board: Board) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(boards).where(boards.c.id == board.id))).one()


async def _titles(engine: AsyncEngine, board: Board) -> list[str]:
    async with engine.connect() as conn:
        found = await conn.scalars(
            select(cards.c.title).where(cards.c.board_id == board.id).order_by(cards.c.title)
        )
        return list(found)


async def _changed_behind_its_back(uow: BoardsUnitOfWork, board: Board) -> None:
    # Another writer's change to the board's row, in this transaction, so that every
    # backend sees it.
    await uow.session.execute(
        update(boards).where(boards.c.id == board.id).values(version=boards.c.version + 1)
    )


def _updates_of(seen: list[str], table: Table) -> list[str]:
    return [s for s in seen if s.startswith(f"UPDATE {table.name} ")]


async def test_a_changed_part_writes_its_root_once_guarded_by_its_version(
    domain: Domain, backend: str
) -> None:
    factory, engine = domain
    board = await _board(domain)
    before = await _row(engine, board)
    async with factory() as uow:
        loaded = await uow.boards.require(board.id)
        with statements(engine) as seen:
            loaded.cards[0].title = "a2"
            await uow.commit()
    root_updates = _updates_of(seen, boards)
    assert len(root_updates) == 1, seen
    assert len(_updates_of(seen, cards)) == 1, seen
    assert "version" in root_updates[0].split("WHERE")[1]  # guarded by the loaded version
    if backend == "postgresql":
        # The same UPDATE names the transaction for a COMMIT whose answer may be lost.
        assert "pg_current_xact_id()" in root_updates[0]
    after = await _row(engine, board)
    assert after.version == before.version + 1 == loaded.version
    assert after.updated_at > before.updated_at
    assert after.updated_at == loaded.updated_at
    assert after.owner_id == before.owner_id
    assert await _titles(engine, board) == ["a2", "b"]
    # A second change in a later unit of work is checked against the version written.
    async with factory() as uow:
        again = await uow.boards.require(board.id)
        assert again.version == after.version
        again.cards[1].title = "b2"
        await uow.commit()
    assert (await _row(engine, board)).version == after.version + 1


async def test_a_root_changed_with_its_parts_is_written_in_one_update(domain: Domain) -> None:
    factory, engine = domain
    board = await _board(domain)
    async with factory() as uow:
        loaded = await uow.boards.require(board.id)
        with statements(engine) as seen:
            loaded.name = "renamed"
            loaded.cards.append(Card(title="c"))
            del loaded.cards[0]
            await uow.session.flush()
            # Flushed, then changed again in the same transaction: bumped once, and the
            # next write is checked against the version this transaction wrote.
            loaded.name = "renamed twice"
            await uow.commit()
    assert len(_updates_of(seen, boards)) == 2, seen
    row = await _row(engine, board)
    assert (row.name, row.version) == ("renamed twice", 2)
    assert await _titles(engine, board) == ["b", "c"]


async def test_a_stale_aggregate_is_refused_and_nothing_of_it_is_written(domain: Domain) -> None:
    factory, engine = domain
    board = await _board(domain)
    async with factory() as uow:
        loaded = await uow.boards.require(board.id)
        await _changed_behind_its_back(uow, board)
        loaded.cards[0].title = "lost"
        loaded.name = "lost too"
        with pytest.raises(ConcurrencyConflict) as raised:
            await uow.commit()
    assert f"Board({board.id})" in str(raised.value)
    assert raised.value.entities == (f"Board({board.id})",)
    row = await _row(engine, board)
    assert (row.name, row.version) == ("plans", 1)  # the whole unit of work rolled back
    assert await _titles(engine, board) == ["a", "b"]


@pytest.mark.postgres_only
async def test_concurrent_writers_of_one_aggregate_one_wins_the_other_is_refused(
    domain: Domain,
) -> None:
    factory, engine = domain
    board = await _board(domain)
    both_loaded = asyncio.Barrier(2)
    outcomes: dict[str, str] = {}

    async def writer(title: str) -> None:
        async with factory() as uow:
            loaded = await uow.boards.require(board.id)
            await both_loaded.wait()
            loaded.cards[0 if title == "x" else 1].title = title
            try:
                await uow.commit()
                outcomes[title] = "committed"
            except ConcurrencyConflict:
                outcomes[title] = "refused"

    await asyncio.gather(writer("x"), writer("y"))
    assert sorted(outcomes.values()) == ["committed", "refused"]
    winner = next(title for title, outcome in outcomes.items() if outcome == "committed")
    row = await _row(engine, board)
    assert row.version == 2
    titles = await _titles(engine, board)
    assert winner in titles and ({"x", "y"} - {winner}).isdisjoint(titles)


async def test_a_relinked_root_is_written_with_its_new_key(domain: Domain) -> None:
    factory, engine = domain
    board = await _board(domain)
    async with factory() as uow:
        loaded = await uow.boards.require(board.id)
        bob = Owner(name="bob")
        loaded.owner = bob  # the flush copies bob's key into the root's row
        loaded.cards[0].title = "a2"
        await uow.commit()
    row = await _row(engine, board)
    assert (row.owner_id, row.version) == (bob.id, 2)
    assert await _titles(engine, board) == ["a2", "b"]


async def test_a_sql_expression_assigned_to_the_root_is_evaluated_by_the_database(
    domain: Domain,
) -> None:
    factory, engine = domain
    board = await _board(domain)
    async with factory() as uow:
        loaded = await uow.boards.require(board.id)
        loaded.name = func.upper(boards.c.name)  # type: ignore[assignment]
        await uow.commit()
    row = await _row(engine, board)
    assert (row.name, row.version) == ("PLANS", 2)


async def test_update_listeners_see_the_roots_update(domain: Domain) -> None:
    factory, _ = domain
    async with factory() as uow:
        item = Watched(label="one")
        await uow.watched.add(item)
        await uow.commit()
    updates_seen.clear()
    async with factory() as uow:
        loaded = await uow.watched.require(item.id)
        loaded.label = "two"
        await uow.commit()
    assert updates_seen == ["two"]
    async with factory() as uow:
        assert (await uow.watched.require(item.id)).version == 2


async def test_a_column_filled_in_on_update_is_filled_in(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        item = Stamped(label="one")
        await uow.stamped.add(item)
        await uow.commit()
    async with factory() as uow:
        loaded = await uow.stamped.require(item.id)
        loaded.label = "two"
        await uow.commit()
    async with engine.connect() as conn:
        row = (await conn.execute(select(stamped).where(stamped.c.id == item.id))).one()
    assert (row.label, row.touched, row.version) == ("two", "by update", 2)


async def test_a_flush_listener_sees_every_row_written(domain: Domain) -> None:
    factory, _ = domain
    board = await _board(domain)
    flushed: list[list[str]] = []

    def record(session: Any, _context: Any) -> None:
        flushed.append(sorted(type(obj).__name__ for obj in session.dirty))

    async with factory() as uow:
        event.listen(uow.session.sync_session, "after_flush", record)
        loaded = await uow.boards.require(board.id)
        loaded.cards[0].title = "a2"
        await uow.commit()
    assert flushed == [["Board", "Card"]]


async def test_a_savepoint_rolled_back_leaves_no_written_value_in_memory(
    domain: Domain,
) -> None:
    factory, engine = domain
    board = await _board(domain)
    async with factory() as uow:
        loaded = await uow.boards.require(board.id)
        card = loaded.cards[0]
        savepoint = await uow.session.begin_nested()
        card.title = "a2"
        await uow.session.flush()
        await savepoint.rollback()
        # What the objects say afterwards is what the database holds, read again.
        assert await uow.session.run_sync(lambda _: card.title) == "a"
        assert await uow.session.run_sync(lambda _: loaded.version) == 1
    assert await _titles(engine, board) == ["a", "b"]


async def test_many_changed_rows_are_written_together_and_each_checked(domain: Domain) -> None:
    factory, engine = domain
    made = [await _board(domain) for _ in range(3)]
    async with factory() as uow:
        loaded = [await uow.boards.require(board.id) for board in made]
        with statements(engine) as seen:
            for n, board in enumerate(loaded):
                board.name = f"board {n}"
                for card in board.cards:
                    card.title = card.title * 2
            await uow.commit()
    # Six parts of one shape: one statement (an executemany), not one per row.
    assert len(_updates_of(seen, cards)) == 1, seen
    for n, board in enumerate(made):
        row = await _row(engine, board)
        assert (row.name, row.version) == (f"board {n}", 2)
        assert await _titles(engine, board) == ["aa", "bb"]
    # One of several roots changed behind the unit of work's back: refused by name, and
    # nothing of the unit of work is written.
    async with factory() as uow:
        loaded = [await uow.boards.require(board.id) for board in made]
        await _changed_behind_its_back(uow, made[1])
        for board in loaded:
            board.name = "lost"
            board.cards[0].title = "lost"
        with pytest.raises(ConcurrencyConflict) as raised:
            await uow.commit()
    assert f"Board({made[1].id})" in raised.value.entities
    for n, board in enumerate(made):
        assert (await _row(engine, board)).name == f"board {n}"
        assert await _titles(engine, board) == ["aa", "bb"]


async def test_a_bump_undone_with_its_savepoint_is_made_again(domain: Domain) -> None:
    factory, engine = domain
    board = await _board(domain)
    async with factory() as uow:
        loaded = await uow.boards.require(board.id)
        savepoint = await uow.session.begin_nested()
        loaded.cards[0].title = "undone"
        await uow.session.flush()  # the root's version goes to 2 inside the savepoint
        await savepoint.rollback()  # and back to 1 with it
        card = await uow.session.run_sync(lambda _: loaded.cards[1])
        card.title = "kept"
        await uow.commit()
    # The change that stands is guarded and counted like any other.
    row = await _row(engine, board)
    assert row.version == 2
    assert await _titles(engine, board) == ["a", "kept"]
