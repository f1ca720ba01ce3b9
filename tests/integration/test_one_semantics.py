"""One semantics on every backend: what the testing kit once did differently, now a test that
runs on memory, SQLite and PostgreSQL alike.

Its own small domain: a pantry of jars (roots) with a many-to-many ``set`` of labels, and a
repository with a method of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, Table, Uuid, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, new_id, request_context
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    tenant_column,
    uuid_pk,
    version_column,
)
from qx.errors import InvalidCursor, InvalidQuery, UnitOfWorkError
from qx.testing import InMemoryStore, InMemoryUnitOfWorkFactory
from tests.integration.conftest import CURSOR_SECRET, own_domain

TENANT = "pantry"


@dataclass(eq=False, kw_only=True)
class Label:
    id: UUID = field(default_factory=new_id)
    text: str


@dataclass(eq=False, kw_only=True)
class Jar(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    stock: int = 0
    labels: set[Label] = field(default_factory=set)
    version: int | None = None
    tenant_id: str | None = None


metadata = make_metadata()
registry = make_registry(metadata)
labels = Table("o_labels", metadata, uuid_pk(), Column("text", String(20), nullable=False))
jars = Table(
    "o_jars",
    metadata,
    uuid_pk(),
    Column("name", String(40), nullable=False, unique=True),
    Column("stock", Integer(), nullable=False),
    version_column(),
    tenant_column(),
)
jar_labels = Table(
    "o_jar_labels",
    metadata,
    Column("jar_id", Uuid(), ForeignKey("o_jars.id"), primary_key=True),
    Column("label_id", Uuid(), ForeignKey("o_labels.id"), primary_key=True),
)
map_entity(registry, Label, labels)
map_aggregate(
    registry,
    Jar,
    jars,
    properties={
        "labels": relationship(Label, secondary=jar_labels, collection_class=set, lazy="selectin")
    },
)


class Jars(Repository[Jar]):
    filterable = frozenset({"name", "stock", "labels__text"})
    sortable = frozenset({"name", "stock"})
    default_order = ("name",)

    async def running_low(self, below: int) -> list[Jar]:
        """A method of the application's own, built on the query API."""
        return await self.query().filter(stock__lt=below).all()


class PantryUnitOfWork(UnitOfWork):
    jars: Jars


Factory = UnitOfWorkFactory[PantryUnitOfWork]


@pytest.fixture
async def pantry(backend: str, tmp_path: Any) -> Any:
    async with own_domain(
        backend, tmp_path, PantryUnitOfWork, metadata, cursor_secret=CURSOR_SECRET
    ) as (factory, _):
        yield factory


async def fill(factory: Factory, *names: str) -> list[Jar]:
    with request_context(tenant_id=TENANT):
        async with factory() as uow:
            made = await uow.jars.add_many(Jar(name=n, stock=i) for i, n in enumerate(names))
            await uow.commit()
    return made


async def test_bulk_update_refuses_what_is_not_a_column_and_coerces_values(
    pantry: Factory,
) -> None:
    await fill(pantry, "jam", "honey")
    with request_context(tenant_id=TENANT):
        async with pantry() as uow:
            rows = await uow.jars.query().filter(name="jam").update(stock=1, returning=True)
            assert [(j.name, j.stock) for j in rows] == [("jam", 1)]
            assert not hasattr(rows[0], "returning")
            for bad in ({"no_such_field": "x"}, {"version": 99}, {"tenant_id": "other"}):
                with pytest.raises(InvalidQuery) as caught:
                    await uow.jars.query().update(**bad)
                assert caught.value.field == next(iter(bad))
            with pytest.raises(InvalidQuery):
                await uow.jars.query().update(stock="many")
            assert await uow.jars.query().filter(name="honey").update(stock="7") == 1
            await uow.commit()
        async with pantry() as uow:
            honey = await uow.jars.query().filter(name="honey").one()
            assert honey.stock == 7 and isinstance(honey.stock, int)
            assert honey.version == 2  # the bulk update bumped it


async def test_every_repository_method_works(pantry: Factory) -> None:
    (jam,) = await fill(pantry, "jam")
    with request_context(tenant_id=TENANT):
        async with pantry() as uow:
            assert isinstance(uow.jars.session, AsyncSession)
            (stored,) = await uow.jars.upsert([Jar(name="jam", stock=9)], conflict=["name"])
            assert stored.id == jam.id and stored.stock == 9 and stored.version == 2
            found, created = await uow.jars.update_or_create(name="jam", defaults={"stock": 3})
            assert not created and found.stock == 3
            other, created = await uow.jars.update_or_create(name="figs", defaults={"stock": 1})
            assert created and other.stock == 1
            await uow.commit()
        async with pantry() as uow:
            page = await uow.jars.page(page_size=1, with_total=True)
            assert page.total == 2 and [j.name for j in page.items] == ["figs"]
            following = await uow.jars.page(page_size=1, cursor=page.next_cursor)
            assert [j.name for j in following.items] == ["jam"]
            assert await uow.jars.query().filter(name="figs").delete(hard=True) == 1
            await uow.commit()
        async with pantry() as uow:
            assert [j.name for j in await uow.jars.list()] == ["jam"]


async def test_bad_arguments_are_refused_the_same_way(pantry: Factory) -> None:
    await fill(pantry, "jam")
    with request_context(tenant_id=TENANT):
        async with pantry() as uow:
            with pytest.raises(InvalidQuery):
                uow.jars.query().limit(True)  # type: ignore[arg-type]
            with pytest.raises(InvalidQuery):
                await uow.jars.get("not-a-uuid")
            with pytest.raises(InvalidQuery) as caught:
                await uow.jars.get_or_create(name="new", defaults={"bogus": 1})
            assert "bogus" in str(caught.value)
            with pytest.raises(InvalidQuery):
                await uow.jars.remove(Jar(name="never loaded"))
            with pytest.raises(InvalidCursor):
                await uow.jars.page(cursor="1")


async def test_delete_and_add_the_same_key_in_one_unit_of_work(pantry: Factory) -> None:
    jam, honey = await fill(pantry, "jam", "honey")
    with request_context(tenant_id=TENANT):
        async with pantry() as uow:
            await uow.jars.hard_remove(await uow.jars.require(jam.id))
            await uow.jars.add(Jar(name="jam", stock=5))  # the same unique name
            await uow.jars.remove(await uow.jars.require(honey.id))
            await uow.jars.add(Jar(id=honey.id, name="honey", stock=6))  # the same primary key
            await uow.commit()
        async with pantry() as uow:
            again = {j.name: j for j in await uow.jars.list()}
            assert again["jam"].id != jam.id and again["jam"].stock == 5
            assert again["honey"].id == honey.id and again["honey"].stock == 6


async def test_set_collections_and_the_order_after_an_update(pantry: Factory) -> None:
    await fill(pantry, "b", "a", "c")
    with request_context(tenant_id=TENANT):
        async with pantry() as uow:
            sweet = Label(text="sweet")
            for jar in await uow.jars.list():
                jar.labels.add(sweet)
            await uow.jars.query().filter(name="a").update(stock=10)
            await uow.commit()
        async with pantry() as uow:
            listed = await uow.jars.list(sort="-stock")
            assert [j.name for j in listed] == ["a", "c", "b"]
            assert all({label.text for label in j.labels} == {"sweet"} for j in listed)
            assert [j.name for j in await uow.jars.list(labels__text="sweet")] == ["a", "b", "c"]


async def test_the_application_repository_and_unit_of_work_are_the_real_ones(
    pantry: Factory,
) -> None:
    await fill(pantry, "jam", "honey", "figs")
    committed: list[str] = []
    assert PantryUnitOfWork.declared_repositories() == {"jars": Jars}
    with request_context(tenant_id=TENANT):
        async with pantry() as uow:
            assert type(uow) is PantryUnitOfWork and type(uow.jars) is Jars
            assert uow.repository(Jars) is uow.jars
            assert [j.name for j in await uow.jars.running_low(2)] == ["honey", "jam"]
            uow.on_commit(lambda: committed.append("done"))
            rows = (await uow.session.execute(select(jars.c.name))).scalars().all()
            assert sorted(rows) == ["figs", "honey", "jam"]
            await uow.commit()
        assert committed == ["done"]
        with pytest.raises(UnitOfWorkError):
            await uow.jars.running_low(2)  # its unit of work is over


async def test_a_factory_shares_its_store_and_another_store_is_another_database() -> None:
    store = InMemoryStore(metadata)
    first: Factory = InMemoryUnitOfWorkFactory(PantryUnitOfWork, store)
    second: Factory = InMemoryUnitOfWorkFactory(PantryUnitOfWork, store)
    elsewhere: Factory = InMemoryUnitOfWorkFactory(PantryUnitOfWork)
    await fill(first, "jam")
    with request_context(tenant_id=TENANT):
        async with second() as uow:
            assert [j.name for j in await uow.jars.list()] == ["jam"]
        async with elsewhere() as uow:
            assert await uow.jars.list() == []
    await store.close()
    await elsewhere.store.close()
