"""Property test of the unit of work's guarantees: generated programs against a model.

A program is a list of steps an application might take - load, add, change a root, a part
or a part's many-to-many set, record, drop a reference, keep only a part, stream, collect
garbage, commit, fail a commit (in a handler or at COMMIT), retry the new objects of a failed
commit. The model says what must hold:

* after each successful commit, the outbox rows it added are exactly the integration events
  recorded since those objects' last successful commit (including what handlers recorded),
  and every library the transaction changed has its version bumped exactly once;
* after each failed commit, the database is unchanged, and the new objects carry exactly
  the events they had recorded, ready to be retried.

The domain is this module's own: libraries (roots) owning shelves (parts) that carry a
many-to-many set of labels.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, ForeignKey, Integer, String, Table, Uuid, delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, DomainEvent, InProcessDispatcher, IntegrationEvent, new_id
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
from qx.errors import IntegrityViolation
from qx.outbox import outbox_table
from qx.settings import DatabaseSettings
from qx.testing import InMemoryUnitOfWorkFactory
from tests.integration.conftest import BACKENDS, drop_schema, engine_with_tables

# -- the domain ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TouchedV1(IntegrationEvent):
    name = "props.touched"
    version = 1
    library_id: UUID
    n: int


@dataclass(frozen=True, kw_only=True)
class Renamed(DomainEvent):
    library_id: UUID
    n: int


@dataclass(frozen=True, kw_only=True)
class RenamedV1(IntegrationEvent):
    """Recorded by the handler of ``Renamed``, on the same library."""

    name = "props.renamed"
    version = 1
    library_id: UUID
    n: int


@dataclass(frozen=True, kw_only=True)
class Poison(DomainEvent):
    """Its handler fails the commit."""


@dataclass(eq=False, kw_only=True)
class Label:
    id: UUID = field(default_factory=new_id)
    text: str


@dataclass(eq=False, kw_only=True)
class Shelf:
    id: UUID = field(default_factory=new_id)
    count: int = 0
    labels: set[Label] = field(default_factory=set)


@dataclass(eq=False, kw_only=True)
class Library(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    shelves: list[Shelf] = field(default_factory=list)
    version: int | None = None

    def touch(self, n: int) -> None:
        self.record(TouchedV1(library_id=self.id, n=n))

    def rename(self, n: int) -> None:
        self.name = f"name-{n}"
        self.record(Renamed(library_id=self.id, n=n))


metadata = make_metadata()
registry = make_registry(metadata)
libraries = Table(
    "p_libraries",
    metadata,
    uuid_pk(),
    Column("name", String(40), nullable=False),
    version_column(),
)
shelves = Table(
    "p_shelves",
    metadata,
    uuid_pk(),
    Column("library_id", Uuid(), ForeignKey("p_libraries.id"), nullable=False),
    Column("count", Integer(), nullable=False),
)
labels = Table("p_labels", metadata, uuid_pk(), Column("text", String(20), nullable=False))
shelf_labels = Table(
    "p_shelf_labels",
    metadata,
    Column("shelf_id", Uuid(), ForeignKey("p_shelves.id"), primary_key=True),
    Column("label_id", Uuid(), ForeignKey("p_labels.id"), primary_key=True),
)
markers = Table(
    "p_markers",
    metadata,
    uuid_pk(),
    # Deferred: a marker naming no library fails the transaction at COMMIT.
    Column(
        "library_id",
        Uuid(),
        ForeignKey("p_libraries.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
)
map_entity(registry, Label, labels)
map_entity(
    registry,
    Shelf,
    shelves,
    properties={
        "labels": relationship(Label, secondary=shelf_labels, collection_class=set, lazy="selectin")
    },
)
map_aggregate(
    registry,
    Library,
    libraries,
    properties={
        "shelves": relationship(Shelf, cascade="all, delete-orphan", order_by=shelves.c.id)
    },
)


class Libraries(Repository[Library]):
    pass


class LibraryUnitOfWork(UnitOfWork):
    libraries: Libraries


def dispatcher() -> InProcessDispatcher:
    found = InProcessDispatcher()

    @found.handler(Renamed)
    async def follow_up(event: Renamed, uow: Any) -> None:
        library = await uow.libraries.require(event.library_id)
        library.record(RenamedV1(library_id=event.library_id, n=event.n))

    @found.handler(Poison)
    async def poisoned(event: Poison, uow: Any) -> None:
        raise RuntimeError("the handler fails this commit")

    return found


# -- the program and its model ---------------------------------------------------------------

STEPS = (
    "load",
    "add",
    "rename",
    "touch",
    "change_part",
    "toggle_label",
    "add_part",
    "remove_part",
    "keep_part",
    "change_kept_part",
    "drop",
    "stream",
    "gc",
    "commit",
    "fail",
    "retry",
)
programs = st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 255)), max_size=30)
EXAMPLES = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
Expected = Counter[tuple[str, str, int]]  # (event name, library id, n)


class Run:
    """Runs one program on a real database and checks the model after each commit."""

    def __init__(self, factory: UnitOfWorkFactory[LibraryUnitOfWork], engine: AsyncEngine):
        self.factory = factory
        self.engine = engine
        self.stack = AsyncExitStack()
        self.uow: LibraryUnitOfWork
        self.start: tuple[Any, Expected, Any]
        self.n = 0
        self.known: list[UUID] = []  # committed libraries
        self.label_ids: list[UUID] = []
        self.refs: dict[UUID, Library] = {}  # what the program still references
        self.kept_parts: list[tuple[UUID, Shelf]] = []
        self.new: dict[UUID, Library] = {}
        self.changed: set[UUID] = set()
        self.expected: dict[UUID, Expected] = {}
        self.carried: dict[UUID, Library] = {}  # new objects of a failed commit
        self.carried_expected: dict[UUID, Expected] = {}
        self.commits = 0

    def next_n(self) -> int:
        self.n += 1
        return self.n

    def expect(self, library_id: UUID, name: str, n: int) -> None:
        self.expected.setdefault(library_id, Counter())[(name, str(library_id), n)] += 1

    async def seed(self) -> None:
        async with self.engine.begin() as conn:
            for table in (outbox_table, markers, shelf_labels, shelves, labels, libraries):
                await conn.execute(delete(table))
        async with self.factory() as uow:
            made = [Library(name=f"seed-{i}", shelves=[Shelf()]) for i in range(4)]
            await uow.libraries.add_many(made)
            for text in ("red", "green", "blue"):
                uow.session.add(Label(text=text))
            await uow.commit()
        self.known = [lib.id for lib in made]
        async with self.engine.connect() as conn:
            self.label_ids = list((await conn.scalars(select(labels.c.id))).all())

    async def open(self) -> None:
        # What the database holds before the transaction, read before it begins (on SQLite
        # the unit of work's BEGIN IMMEDIATE locks out other connections' transactions).
        self.start = (await self.contents(), await self.outbox(), await self.snapshot())
        self.uow = await self.stack.enter_async_context(self.factory())
        self.refs, self.kept_parts, self.new, self.changed, self.expected = {}, [], {}, set(), {}

    async def library(self, arg: int) -> Library | None:
        choices = [*self.known, *self.new]
        if not choices:
            return None
        library_id = choices[arg % len(choices)]
        found = self.refs.get(library_id)
        if found is None:
            found = self.new.get(library_id) or await self.uow.libraries.require(library_id)
            self.refs[library_id] = found
        return found

    def mark_changed(self, library: Library) -> None:
        if library.id not in self.new:
            self.changed.add(library.id)

    async def snapshot(self) -> tuple[Any, ...]:
        async with self.engine.connect() as conn:
            return (
                sorted((await conn.execute(select(libraries))).all()),
                sorted((await conn.execute(select(shelves))).all()),
                sorted((await conn.execute(select(shelf_labels))).all()),
                await conn.scalar(select(func.count()).select_from(outbox_table)),
                await conn.scalar(select(func.count()).select_from(markers)),
            )

    async def contents(self) -> dict[UUID, tuple[int, Any]]:
        """Each stored library's version, and everything else stored about its aggregate."""
        async with self.engine.connect() as conn:
            tags: dict[UUID, list[UUID]] = {}
            for row in await conn.execute(select(shelf_labels)):
                tags.setdefault(row.shelf_id, []).append(row.label_id)
            parts: dict[UUID, list[Any]] = {}
            for row in await conn.execute(select(shelves)):
                parts.setdefault(row.library_id, []).append(
                    (row.id, row.count, sorted(tags.get(row.id, [])))
                )
            return {
                row.id: (row.version, (row.name, sorted(parts.get(row.id, []))))
                for row in await conn.execute(select(libraries))
            }

    async def outbox(self) -> Expected:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(outbox_table.c.event_name, outbox_table.c.payload))
            return Counter(
                (row.event_name, row.payload["library_id"], row.payload["n"]) for row in rows
            )

    # -- steps ------------------------------------------------------------------------------

    async def step_load(self, arg: int) -> None:
        await self.library(arg)

    async def step_add(self, arg: int) -> None:
        library = Library(name=f"new-{self.next_n()}", shelves=[Shelf()] if arg % 2 else [])
        n = self.next_n()
        library.touch(n)
        self.expect(library.id, "props.touched", n)
        await self.uow.libraries.add(library)
        self.new[library.id] = library
        if arg % 4 == 3:
            return  # the program keeps no reference to it
        self.refs[library.id] = library

    async def step_rename(self, arg: int) -> None:
        library = await self.library(arg)
        if library is None:
            return
        n = self.next_n()
        library.rename(n)
        self.expect(library.id, "props.renamed", n)  # the handler's follow-up
        self.mark_changed(library)

    async def step_touch(self, arg: int) -> None:
        library = await self.library(arg)
        if library is None:
            return
        n = self.next_n()
        library.touch(n)
        self.expect(library.id, "props.touched", n)

    async def step_change_part(self, arg: int) -> None:
        library = await self.library(arg)
        if library is None:
            return
        if library.shelves:
            library.shelves[0].count += 1
        else:
            library.shelves.append(Shelf())
        self.mark_changed(library)

    async def step_toggle_label(self, arg: int) -> None:
        library = await self.library(arg)
        if library is None or not library.shelves:
            return
        label = await self.uow.session.get(Label, self.label_ids[arg % len(self.label_ids)])
        assert label is not None
        shelf = library.shelves[-1]
        if label in shelf.labels:
            shelf.labels.remove(label)
        else:
            shelf.labels.add(label)
        self.mark_changed(library)

    async def step_add_part(self, arg: int) -> None:
        library = await self.library(arg)
        if library is None:
            return
        library.shelves.append(Shelf(count=arg))
        self.mark_changed(library)

    async def step_remove_part(self, arg: int) -> None:
        library = await self.library(arg)
        if library is None or not library.shelves:
            return
        library.shelves.pop()
        self.mark_changed(library)

    async def step_keep_part(self, arg: int) -> None:
        library = await self.library(arg)
        if library is None or not library.shelves:
            return
        self.kept_parts.append((library.id, library.shelves[0]))
        self.refs.pop(library.id, None)  # only the part is kept

    async def step_change_kept_part(self, arg: int) -> None:
        if not self.kept_parts:
            return
        library_id, shelf = self.kept_parts[arg % len(self.kept_parts)]
        shelf.count += 1
        if library_id not in self.new:
            self.changed.add(library_id)

    async def step_drop(self, arg: int) -> None:
        if arg % 3 == 0:
            self.refs.clear()
        elif self.refs:
            self.refs.pop(list(self.refs)[arg % len(self.refs)])

    async def step_stream(self, arg: int) -> None:
        position = 0
        async for library in self.uow.libraries.query().stream(chunk_size=2):
            action = (arg >> (2 * (position % 4))) % 4
            position += 1
            if action == 1:
                n = self.next_n()
                library.touch(n)
                self.expect(library.id, "props.touched", n)
            elif action == 2:
                n = self.next_n()
                library.rename(n)
                self.expect(library.id, "props.renamed", n)
                self.mark_changed(library)
            elif action == 3 and library.shelves:
                library.shelves[0].count += 1
                self.mark_changed(library)
        # The program kept no reference to what it streamed (beyond those it had).

    async def step_gc(self, arg: int) -> None:
        gc.collect()

    async def step_commit(self, arg: int) -> None:
        before, before_outbox, _ = self.start
        self.refs.clear()
        self.kept_parts.clear()
        gc.collect()
        await self.uow.commit()
        await self.stack.aclose()
        self.commits += 1
        added = await self.outbox() - before_outbox
        wanted: Expected = sum(self.expected.values(), Counter())
        assert added == wanted, f"outbox rows {added} != recorded {wanted}"
        after = await self.contents()
        for library_id, (version, content) in before.items():
            bump = after[library_id][0] - version
            if library_id not in self.changed:
                assert bump == 0, f"{library_id}: bumped without a change"
            elif after[library_id][1] != content:
                assert bump == 1, f"{library_id}: changed, version moved by {bump}"
            else:
                # Changed and changed back: a bump is allowed when an autoflush wrote the
                # intermediate state, never more than one.
                assert bump in (0, 1), f"{library_id}: version moved by {bump}"
        for library_id in self.new:
            assert after[library_id][0] == 1
        self.known.extend(self.new)
        await self.open()

    async def step_fail(self, arg: int) -> None:
        before = self.start[2]
        new = dict(self.new)
        pending = {
            library_id: Counter(self.expected.get(library_id, Counter())) for library_id in new
        }
        recorded = {library_id: len(library.pending_events) for library_id, library in new.items()}
        self.refs.clear()
        self.kept_parts.clear()
        if arg % 2:
            self.uow.emit(Poison())
            failure: type[Exception] = RuntimeError
        else:
            connection = await self.uow.session.connection()
            await connection.execute(markers.insert().values(id=new_id(), library_id=new_id()))
            failure = IntegrityViolation
        with pytest.raises(failure):
            await self.uow.commit()
        await self.stack.aclose()
        assert await self.snapshot() == before, "a failed commit changed the database"
        for library_id, library in new.items():
            # The same objects, with exactly the events recorded before commit().
            assert len(library.pending_events) == recorded[library_id]
        self.carried.update(new)
        self.carried_expected.update(pending)
        await self.open()

    async def step_retry(self, arg: int) -> None:
        if not self.carried:
            return
        await self.uow.libraries.add_many(self.carried.values())
        for library_id, library in self.carried.items():
            self.new[library_id] = library
            self.refs[library_id] = library
            self.expected.setdefault(library_id, Counter()).update(
                self.carried_expected.get(library_id, Counter())
            )
        self.carried, self.carried_expected = {}, {}

    async def run(self, program: list[tuple[str, int]]) -> None:
        await self.seed()
        await self.open()
        try:
            for name, arg in program:
                await getattr(self, f"step_{name}")(arg)
            await self.step_retry(0)
            await self.step_commit(0)
        finally:
            await self.stack.aclose()


@dataclass(frozen=True)
class Database:
    url: str  # empty: the testing kit's in-memory database, new for each program
    connect_args: dict[str, Any]

    def run(self, program: list[tuple[str, int]]) -> None:
        async def main() -> None:
            if not self.url:
                factory: UnitOfWorkFactory[LibraryUnitOfWork] = InMemoryUnitOfWorkFactory(
                    LibraryUnitOfWork, dispatcher=dispatcher()
                )
                async with factory.store:
                    await Run(factory, factory.store.engine).run(program)
                return
            engine = create_engine(DatabaseSettings(url=self.url), connect_args=self.connect_args)
            try:
                factory = UnitOfWorkFactory(
                    LibraryUnitOfWork, create_session_factory(engine), dispatcher=dispatcher()
                )
                await Run(factory, engine).run(program)
            finally:
                await engine.dispose()

        asyncio.run(main())


@pytest.fixture(scope="module", params=BACKENDS)
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    if request.param == "memory":
        yield Database("", {})
        return
    tmp_path = Path(tmp_path_factory.mktemp("uow-props"))

    async def setup() -> tuple[Database, str | None]:
        engine, schema = await engine_with_tables(request.param, tmp_path, metadata)
        try:
            url = engine.url.render_as_string(hide_password=False)
            args = {"server_settings": {"search_path": schema}} if schema else {}
            return Database(url, args), schema
        finally:
            await engine.dispose()

    found, schema = asyncio.run(setup())
    yield found
    if schema is not None:
        asyncio.run(drop_schema(schema))


@EXAMPLES
@given(program=programs)
def test_generated_programs_keep_events_versions_and_retries(
    database: Database, program: list[tuple[str, int]]
) -> None:
    database.run(program)


@pytest.mark.parametrize(
    "program",
    [
        # A stream that changes parts, a failure at COMMIT, a retry, a commit.
        [("add", 1), ("stream", 0b11101001), ("fail", 0), ("retry", 0), ("commit", 0)],
        # Keep only a part, drop the root, collect garbage, change the part.
        [("keep_part", 0), ("gc", 0), ("change_kept_part", 0), ("commit", 0)],
        # A many-to-many change on a part, an autoflush in between, a handler failure.
        [("toggle_label", 1), ("load", 2), ("toggle_label", 2), ("add", 3), ("fail", 1)],
    ],
)
def test_programs_written_out(database: Database, program: list[tuple[str, int]]) -> None:
    database.run(program)
