"""What the end of a unit of work (or ``expunge_all``) does to the objects it loaded.

The transaction holds every aggregate root it loads until it ends, so that events recorded
on a root the application let go of still reach the outbox. When the session lets go of its
objects - at the end of the block, or at ``session.expunge_all()`` - the hold ends with it:
an object the application kept is detached and stays readable and usable in a later unit of
work; an object nobody kept is freed at once (reference counting, collector off); a
``persistent_to_detached`` listener hears of each object kept, as with a plain session; and
roots loaded after an ``expunge_all`` are held again. A small shelf-and-books domain of its
own, on every backend.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, Table, Uuid, event, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, IntegrationEvent, new_id
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    uuid_pk,
    version_column,
)
from qx.outbox import outbox_table
from tests.integration.conftest import own_domain

shelf_metadata = make_metadata()
registry = make_registry(shelf_metadata)


@dataclass(frozen=True, kw_only=True)
class ShelfRelabelled(IntegrationEvent):
    name = "library.shelf_relabelled"
    version = 1
    shelf_id: UUID
    label: str


@dataclass(eq=False, kw_only=True)
class Book:
    id: UUID = field(default_factory=new_id)
    title: str
    pages: int


@dataclass(eq=False, kw_only=True)
class Shelf(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    label: str
    books: list[Book] = field(default_factory=list)
    version: int = 1

    def announce(self, label: str) -> None:
        """Record a relabelling without changing a column (only the event tells)."""
        self.record(ShelfRelabelled(shelf_id=self.id, label=label))


shelves = Table(
    "se_shelves",
    shelf_metadata,
    uuid_pk(),
    Column("label", String(40), nullable=False, unique=True),
    version_column(),
)
books = Table(
    "se_books",
    shelf_metadata,
    uuid_pk(),
    Column("shelf_id", Uuid(), ForeignKey("se_shelves.id"), nullable=False),
    Column("title", String(40), nullable=False),
    Column("pages", Integer, nullable=False),
)
map_entity(registry, Book, books)
map_aggregate(
    registry,
    Shelf,
    shelves,
    properties={"books": relationship(Book, cascade="all, delete-orphan", lazy="selectin")},
)


class Shelves(Repository[Shelf]):
    filterable = frozenset({"label"})


class LibraryUnitOfWork(UnitOfWork):
    shelves: Shelves


Domain = tuple[UnitOfWorkFactory[LibraryUnitOfWork], AsyncEngine]


@pytest.fixture
async def domain(backend: str, tmp_path: Any) -> AsyncIterator[Domain]:
    async with own_domain(backend, tmp_path, LibraryUnitOfWork, shelf_metadata) as made:
        factory = made[0]
        async with factory() as uow:
            await uow.shelves.add_many(
                Shelf(label=f"s{n}", books=[Book(title=f"b{n}.{k}", pages=k) for k in range(3)])
                for n in range(5)
            )
            await uow.commit()
        yield made


async def _rows(engine: AsyncEngine, statement: Any) -> Sequence[Any]:
    async with engine.connect() as conn:
        return (await conn.execute(statement)).all()


async def test_a_kept_aggregate_is_detached_readable_and_usable_later(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        shelf = await uow.shelves.query().filter(label="s1").one()
    state = inspect(shelf)
    assert state.detached and state.session_id is None
    assert [b.title for b in shelf.books] == ["b1.0", "b1.1", "b1.2"]  # loaded, still there
    async with factory() as uow:
        again = await uow.shelves.get(shelf.id)
        assert again is not shelf  # a new unit of work loads its own copy
        again.label = "s1-renamed"
        await uow.commit()
    assert await _rows(
        engine, select(shelves.c.label, shelves.c.version).where(shelves.c.id == shelf.id)
    ) == [("s1-renamed", 2)]


@pytest.mark.usefixtures("collector_off")
async def test_aggregates_nobody_kept_are_held_in_the_block_and_freed_at_its_end(
    domain: Domain,
) -> None:
    factory, _ = domain
    async with factory() as uow:
        loaded = await uow.shelves.list()
        gone = [weakref.ref(shelf) for shelf in loaded]
        parts = [weakref.ref(book) for shelf in loaded for book in shelf.books]
        kept = loaded[0]
        del loaded
        # Held by the transaction while it lasts: each could still record an event.
        assert all(ref() is not None for ref in gone)
    assert gone[0]() is kept
    assert [ref() for ref in gone[1:]] == [None] * 4
    assert sum(ref() is not None for ref in parts) == 3  # the kept shelf's books
    assert inspect(kept).detached


async def test_a_detach_listener_hears_of_each_object_kept(domain: Domain) -> None:
    factory, _ = domain
    heard: list[Any] = []
    async with factory() as uow:
        event.listen(
            uow.session.sync_session,
            "persistent_to_detached",
            lambda _session, obj: heard.append(obj),
        )
        kept = await uow.shelves.query().filter(label="s2").one()
        await uow.shelves.query().filter(label="s3").one()  # let go of at once
    assert {id(obj) for obj in heard} == {id(kept), *(id(book) for book in kept.books)}


async def test_roots_loaded_after_expunge_all_are_held_until_commit(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        before = await uow.shelves.query().filter(label="s3").one()
        uow.session.expunge_all()
        assert inspect(before).detached
        (await uow.shelves.query().filter(label="s4").one()).announce("poetry")
        # The reference is gone; the transaction holds the root, and its event.
        gc.collect()
        await uow.commit()
    events = await _rows(engine, select(outbox_table.c.event_name, outbox_table.c.payload))
    assert [(name, payload["label"]) for name, payload in events] == [
        ("library.shelf_relabelled", "poetry")
    ]


async def test_a_new_aggregate_added_before_expunge_all_keeps_its_events(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        shelf = await uow.shelves.add(Shelf(label="new", books=[Book(title="n.0", pages=1)]))
        shelf.announce("fresh")
        del shelf
        uow.session.expunge_all()  # the loaded objects leave; the added one is the unit's own
        gc.collect()
        await uow.commit()
    assert await _rows(engine, select(shelves.c.label).where(shelves.c.label == "new")) == [
        ("new",)
    ]
    events = await _rows(engine, select(outbox_table.c.payload))
    assert [payload["label"] for (payload,) in events] == ["fresh"]
