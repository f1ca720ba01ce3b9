"""``Repository.get`` scoping on both of its paths.

Aggregates whose parts load in statements of their own (selectin) are read by primary key
and checked in Python, and each part load gets its own tenant/soft-delete WHERE; aggregates
with joined parts keep loader criteria on their one statement. Both must hide exactly what
a scoped query hides; queries reading roots alone take the first path too.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id, request_context, system_context, utcnow
from qx.db import UnitOfWorkFactory
from qx.db._scoping import checks_rows_in_python, joined_part
from qx.errors import TenantRequired
from qx.examples.orders.domain import Order
from tests.models import AppUnitOfWork, Book, Folder, Item, Note, Shelf, notes

Factory = UnitOfWorkFactory[AppUnitOfWork]


def test_the_path_follows_the_loader_strategies() -> None:
    assert checks_rows_in_python(inspect(Folder))  # selectin parts
    assert checks_rows_in_python(inspect(Order))
    assert checks_rows_in_python(inspect(Item))  # selectin parts, raise_on_sql links
    assert not checks_rows_in_python(inspect(Shelf))  # joined parts read in the root SELECT
    folder_part = joined_part(inspect(Folder))
    assert folder_part is not None and folder_part.key == "notes"
    assert joined_part(inspect(Shelf)) is None  # the criteria path joins on its own terms


async def _folder_with_foreign_and_deleted_notes(uow_factory: Factory) -> Folder:
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            folder = Folder(name="f", notes=[Note(text="a1"), Note(text="a2-deleted")])
            await uow.folders.add(folder)
            await uow.commit()
    with system_context():
        async with uow_factory() as uow:
            loaded = await uow.folders.require(folder.id)
            loaded.notes.append(Note(text="b-secret", tenant_id="B"))  # B's row under A's root
            await uow.session.execute(
                update(notes).where(notes.c.text == "a2-deleted").values(deleted_at=utcnow())
            )
            await uow.commit()
    return folder


async def test_selectin_parts_are_scoped_by_tenant_and_soft_delete(uow_factory: Factory) -> None:
    folder = await _folder_with_foreign_and_deleted_notes(uow_factory)
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            loaded = await uow.folders.require(folder.id)
            assert [n.text for n in loaded.notes] == ["a1"]
        async with uow_factory() as uow:
            loaded = await uow.folders.require(folder.id, with_deleted=True)
            assert [n.text for n in loaded.notes] == ["a1", "a2-deleted"]
    with request_context(tenant_id="B"):
        async with uow_factory() as uow:
            assert await uow.folders.get(folder.id) is None
    with system_context():
        async with uow_factory() as uow:
            loaded = await uow.folders.require(folder.id)
            assert [n.text for n in loaded.notes] == ["a1", "b-secret"]


async def test_queries_scope_selectin_parts_as_get_does(uow_factory: Factory) -> None:
    # A query reading the roots alone takes the same path as get (the roots scoped by a WHERE,
    # each part load by its own): another tenant's part and a soft-deleted one stay hidden
    # whatever the terminal, the deleted one shown with_deleted, both in a system context.
    await _folder_with_foreign_and_deleted_notes(uow_factory)

    async def parts(with_deleted: bool = False) -> list[list[str]]:
        async with uow_factory() as uow:
            query = uow.folders.query().with_deleted(with_deleted)
            found = [
                await query.all(),
                [await query.first()],
                (await query.page(page_number=1)).items,
                [await query.one()],
            ]
            return [
                sorted(n.text for f in rows if f is not None for n in f.notes) for rows in found
            ]

    with request_context(tenant_id="A"):
        assert await parts() == [["a1"]] * 4
        assert await parts(with_deleted=True) == [["a1", "a2-deleted"]] * 4
    with system_context():
        assert await parts() == [["a1", "b-secret"]] * 4


async def test_a_soft_deleted_root_is_found_only_with_deleted(uow_factory: Factory) -> None:
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            folder = Folder(name="gone", notes=[Note(text="n")])
            await uow.folders.add(folder)
            await uow.commit()
        async with uow_factory() as uow:
            await uow.folders.remove(await uow.folders.require(folder.id))
            await uow.commit()
        async with uow_factory() as uow:
            assert await uow.folders.get(folder.id) is None
            found = await uow.folders.get(folder.id, with_deleted=True)
            assert found is not None and found.deleted_at is not None


async def test_joined_parts_keep_the_criteria(uow_factory: Factory) -> None:
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            shelf = Shelf(name="s", books=[Book(title="a")])
            await uow.shelves.add(shelf)
            await uow.commit()
    with system_context():
        async with uow_factory() as uow:
            loaded = await uow.shelves.require(shelf.id)
            loaded.books.append(Book(title="b-secret", tenant_id="B"))
            await uow.commit()
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            loaded = await uow.shelves.require(shelf.id)
            assert [b.title for b in loaded.books] == ["a"]
    with request_context(tenant_id="B"):
        async with uow_factory() as uow:
            assert await uow.shelves.get(shelf.id) is None


async def test_get_fails_closed_without_a_tenant_even_for_unknown_ids(
    uow_factory: Factory,
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(TenantRequired, match="Folder"):
            await uow.folders.get(new_id())
        with pytest.raises(TenantRequired, match="Shelf"):
            await uow.shelves.get(new_id())


async def test_get_reads_root_and_parts_in_one_statement(
    engine: AsyncEngine, uow_factory: Factory
) -> None:
    await _folder_with_foreign_and_deleted_notes(uow_factory)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        with request_context(tenant_id="A"):
            async with uow_factory() as uow:
                (ident,) = (await uow.session.scalars(select(Folder.id))).all()
                statements.clear()
                loaded = await uow.folders.require(ident)
                assert [n.text for n in loaded.notes] == ["a1"]
                assert len(statements) == 1 and "JOIN notes" in statements[0], statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def test_hidden_parts_are_left_alone_when_the_aggregate_changes(
    uow_factory: Factory,
) -> None:
    folder = await _folder_with_foreign_and_deleted_notes(uow_factory)
    with request_context(tenant_id="A"):
        async with uow_factory() as uow:
            loaded = await uow.folders.require(folder.id)
            loaded.notes[0].text = "a1-edited"
            loaded.notes.append(Note(text="a3"))
            await uow.commit()
        async with uow_factory() as uow:
            loaded = await uow.folders.require(folder.id)
            assert [n.text for n in loaded.notes] == ["a1-edited", "a3"]
            loaded.notes.remove(loaded.notes[0])  # an orphan now: deleted, and only it
            await uow.commit()
    with system_context():
        async with uow_factory() as uow:
            stored = await uow.session.execute(
                select(notes.c.text, notes.c.deleted_at.is_not(None)).order_by(notes.c.text)
            )
            assert stored.all() == [("a2-deleted", True), ("a3", False), ("b-secret", False)]
