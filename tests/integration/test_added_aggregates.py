"""New aggregates added through a repository, as an application uses them before commit.

A repository's ``add`` notes a new aggregate on the transaction instead of handing it to the
session, and the commit writes it without the session's per-object bookkeeping. Everything
an application could do with it in between must behave as if the session held it: queries
and loads by key find it, a commit that also changes loaded aggregates writes both, its
events reach the outbox, a handler's reads see it, adding it twice (or to the session too)
writes it once, and a loop of adds and loads by key does not flush once per load. A small
project tracker of its own: projects owning tasks, an integration event per opening.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, Table, Uuid, event, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, DomainEvent, InProcessDispatcher, IntegrationEvent, new_id
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

tracker_metadata = make_metadata()
registry = make_registry(tracker_metadata)


@dataclass(frozen=True, kw_only=True)
class ProjectOpened(IntegrationEvent):
    name = "tracker.project_opened"
    version = 1
    project_id: UUID


@dataclass(frozen=True, kw_only=True)
class TaskPlanned(DomainEvent):
    project_id: UUID
    title: str


@dataclass(eq=False, kw_only=True)
class Task:
    id: UUID = field(default_factory=new_id)
    title: str
    points: int


@dataclass(eq=False, kw_only=True)
class Project(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    tasks: list[Task] = field(default_factory=list)
    version: int = 1

    @classmethod
    def open(cls, name: str, *titles: str) -> Project:
        project = cls(name=name, tasks=[Task(title=t, points=k) for k, t in enumerate(titles)])
        project.record(ProjectOpened(project_id=project.id))
        for title in titles:
            project.record(TaskPlanned(project_id=project.id, title=title))
        return project


projects = Table(
    "aa_projects",
    tracker_metadata,
    uuid_pk(),
    Column("name", String(40), nullable=False, unique=True),
    version_column(),
)
tasks = Table(
    "aa_tasks",
    tracker_metadata,
    uuid_pk(),
    Column("project_id", Uuid(), ForeignKey("aa_projects.id"), nullable=False),
    Column("title", String(40), nullable=False),
    Column("points", Integer, nullable=False),
)
map_entity(registry, Task, tasks)
map_aggregate(
    registry,
    Project,
    projects,
    properties={"tasks": relationship(Task, cascade="all, delete-orphan")},
)


class Projects(Repository[Project]):
    filterable = frozenset({"name"})


class TrackerUnitOfWork(UnitOfWork):
    projects: Projects


Domain = tuple[UnitOfWorkFactory[TrackerUnitOfWork], AsyncEngine]


@pytest.fixture
async def domain(backend: str, tmp_path: Any) -> AsyncIterator[Domain]:
    async with own_domain(backend, tmp_path, TrackerUnitOfWork, tracker_metadata) as made:
        yield made


async def _rows(engine: AsyncEngine, statement: Any) -> Sequence[Any]:
    async with engine.connect() as conn:
        return (await conn.execute(statement)).all()


async def _names(engine: AsyncEngine) -> list[str]:
    return sorted(row[0] for row in await _rows(engine, select(projects.c.name)))


async def test_queries_and_loads_by_key_find_an_added_aggregate(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        project = await uow.projects.add(Project.open("apollo", "design", "build"))
        assert await uow.projects.get(project.id) is project  # the same object, not a copy
        assert await uow.projects.query().filter(name="apollo").count() == 1
        assert [p.name for p in await uow.projects.list()] == ["apollo"]
        await uow.commit()
    assert await _names(engine) == ["apollo"]
    assert len(await _rows(engine, select(tasks.c.id))) == 2
    assert len(await _rows(engine, select(outbox_table.c.id))) == 1


async def test_one_commit_writes_added_and_changed_aggregates(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        first = await uow.projects.add(Project.open("apollo", "design"))
        await uow.commit()
    async with factory() as uow:
        loaded = await uow.projects.require(first.id)
        loaded.tasks.append(Task(title="test", points=3))
        await uow.projects.add(Project.open("gemini", "launch"))
        await uow.commit()
    assert await _names(engine) == ["apollo", "gemini"]
    found = await _rows(engine, select(projects.c.name, projects.c.version))
    assert sorted(tuple(row) for row in found) == [("apollo", 2), ("gemini", 1)]
    assert len(await _rows(engine, select(tasks.c.id))) == 3
    assert len(await _rows(engine, select(outbox_table.c.id))) == 2


async def test_a_handler_sees_the_added_aggregate(backend: str, tmp_path: Any) -> None:
    seen: list[int] = []

    async def count_tasks(event: TaskPlanned, uow: TrackerUnitOfWork) -> None:
        project = await uow.projects.require(event.project_id)
        seen.append(len(project.tasks))

    dispatcher = InProcessDispatcher()
    dispatcher.subscribe(TaskPlanned, count_tasks)
    async with own_domain(
        backend, tmp_path, TrackerUnitOfWork, tracker_metadata, dispatcher=dispatcher
    ) as (factory, engine):
        async with factory() as uow:
            await uow.projects.add(Project.open("apollo", "design", "build"))
            await uow.commit()
        assert seen == [2, 2]
        assert await _names(engine) == ["apollo"]
        assert len(await _rows(engine, select(tasks.c.id))) == 2


async def test_an_aggregate_added_twice_is_written_once(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        project = Project.open("apollo", "design")
        await uow.projects.add(project)
        await uow.projects.add(project)
        await uow.projects.add_many([project])
        uow.session.add(project)  # and to the session itself, through the escape hatch
        await uow.commit()
    assert await _names(engine) == ["apollo"]
    assert len(await _rows(engine, select(tasks.c.id))) == 1
    assert len(await _rows(engine, select(outbox_table.c.id))) == 1


async def test_an_added_aggregate_left_uncommitted_is_not_written(domain: Domain) -> None:
    factory, engine = domain
    project = Project.open("apollo", "design")
    async with factory() as uow:
        await uow.projects.add(project)
    assert await _names(engine) == []
    # Still new: another unit of work writes it, with the events it recorded.
    async with factory() as uow:
        await uow.projects.add(project)
        await uow.commit()
    assert await _names(engine) == ["apollo"]
    assert len(await _rows(engine, select(outbox_table.c.id))) == 1


async def test_adds_between_loads_by_key_are_written_together(domain: Domain) -> None:
    factory, engine = domain
    async with factory() as uow:
        stored = await uow.projects.add_many(Project.open(f"p{k}", "t") for k in range(5))
        await uow.commit()
    writes: list[str] = []

    def saw(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if re.search(r"\b(INSERT|UPDATE)\b", statement):
            writes.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", saw)
    try:
        async with factory() as uow:
            for k, project in enumerate(stored):
                loaded = await uow.projects.require(project.id)
                loaded.name = f"renamed{k}"
                await uow.projects.add(Project.open(f"new{k}", "t"))
            await uow.commit()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", saw)
    # A load by key that cannot read a new aggregate does not flush it: the new projects
    # are written at commit in one statement, not one per load.
    inserted = [sql for sql in writes if re.search(r"INSERT INTO aa_projects", sql)]
    assert len(inserted) == 1, writes
    renamed = [f"renamed{k}" for k in range(5)]
    assert await _names(engine) == sorted([f"new{k}" for k in range(5)] + renamed)
