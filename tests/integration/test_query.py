"""The query API on SQLite and PostgreSQL: lookups, relations, terminals, pages, bulk writes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id, request_context, system_context
from qx.db import UnitOfWorkFactory
from qx.db.query import Q
from qx.errors import ConfigurationError, InvalidCursor, InvalidQuery, NotFound
from tests import models
from tests.integration.helpers import new_order
from tests.models import Category, Group, Item, Tag

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


async def seed(factory: Factory, tenant: str = "t1") -> dict[str, Item]:
    """Eight items with NULLs, duplicates, LIKE wildcards, tags, a category and groups."""
    with request_context(tenant_id=tenant):
        async with factory() as uow:
            tools = Category(code=f"{tenant}-tools", name="Tools")
            toys = Category(code=f"{tenant}-toys", name="Toys")
            red, blue = Group(name="red"), Group(name="blue")
            specs: list[dict[str, Any]] = [
                {
                    "name": "alpha",
                    "sku": "A1",
                    "rank": 1,
                    "score": 10,
                    "price": "1.50",
                    "category": tools,
                    "tags": ["x", "y"],
                    "groups": [red],
                },
                {
                    "name": "beta",
                    "sku": "B1",
                    "rank": 2,
                    "score": None,
                    "price": None,
                    "category": tools,
                    "tags": ["y"],
                    "groups": [red, blue],
                },
                {
                    "name": "Gamma",
                    "sku": "G1",
                    "rank": 2,
                    "score": 30,
                    "price": "3.00",
                    "category": toys,
                    "tags": [],
                    "groups": [],
                },
                {
                    "name": "delta",
                    "sku": "D1",
                    "rank": 3,
                    "score": 10,
                    "price": "4.25",
                    "category": None,
                    "tags": ["z"],
                    "groups": [blue],
                },
                {
                    "name": "100%",
                    "sku": "P1",
                    "rank": 5,
                    "score": None,
                    "price": "5.00",
                    "category": None,
                    "tags": [],
                    "groups": [],
                },
                {
                    "name": "a_b",
                    "sku": "U1",
                    "rank": 5,
                    "score": 50,
                    "price": "6.00",
                    "category": toys,
                    "tags": ["x"],
                    "groups": [],
                },
                {
                    "name": "aXb",
                    "sku": "X1",
                    "rank": 8,
                    "score": 60,
                    "price": None,
                    "category": None,
                    "tags": [],
                    "groups": [],
                },
                {
                    "name": "epsilon",
                    "sku": "E1",
                    "rank": 9,
                    "score": -5,
                    "price": "0.10",
                    "category": tools,
                    "tags": ["x", "x2"],
                    "groups": [red],
                },
            ]
            made: dict[str, Item] = {}
            for spec in specs:
                tags = [Tag(label=label, weight=len(label)) for label in spec.pop("tags")]
                price = spec.pop("price")
                item = Item(**spec, tags=tags, price=Decimal(price) if price else None)
                await uow.items.add(item)
                made[item.name] = item
            await uow.commit()
    return made


def names(items: list[Item]) -> list[str]:
    return [item.name for item in items]


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def test_lookups(uow_factory: Factory) -> None:
    await seed(uow_factory)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"name": "alpha"}, {"alpha"}),
        ({"name__iexact": "GAMMA"}, {"Gamma"}),
        ({"name__ne": "alpha", "rank__lte": 2}, {"beta", "Gamma"}),
        ({"score__ne": 10}, {"beta", "Gamma", "100%", "a_b", "aXb", "epsilon"}),
        ({"name__contains": "a"}, {"alpha", "beta", "Gamma", "delta", "a_b", "aXb"}),
        ({"name__contains": "A"}, set()),
        ({"name__icontains": "A"}, {"alpha", "beta", "Gamma", "delta", "a_b", "aXb"}),
        ({"name__startswith": "a"}, {"alpha", "a_b", "aXb"}),
        ({"name__istartswith": "G"}, {"Gamma"}),
        ({"name__endswith": "ta"}, {"beta", "delta"}),
        ({"name__iendswith": "MMA"}, {"Gamma"}),
        ({"name__in": ["alpha", "beta", "nope"]}, {"alpha", "beta"}),
        ({"name__in": "alpha,beta"}, {"alpha", "beta"}),
        ({"rank__gt": 5}, {"aXb", "epsilon"}),
        ({"rank__gte": 5}, {"100%", "a_b", "aXb", "epsilon"}),
        ({"score__lt": 10}, {"epsilon"}),
        ({"rank__range": (2, 3)}, {"beta", "Gamma", "delta"}),
        ({"rank__range": "2,3"}, {"beta", "Gamma", "delta"}),
        ({"score__isnull": True}, {"beta", "100%"}),
        ({"score__isnull": "false", "rank__lt": 3}, {"alpha", "Gamma"}),
        ({"score": None}, {"beta", "100%"}),
        ({"price__gte": "4.25"}, {"delta", "100%", "a_b"}),
        ({"score": "10"}, {"alpha", "delta"}),
    ]
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            for lookups, expected in cases:
                found = await uow.items.query().filter(**lookups).all()
                assert set(names(found)) == expected, lookups


async def test_like_wildcards_in_values_are_literal(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            query = uow.items.query()
            assert names(await query.filter(name__contains="%").all()) == ["100%"]
            assert names(await query.filter(name__contains="_").all()) == ["a_b"]
            assert names(await query.filter(name__startswith="a_").all()) == ["a_b"]
            assert names(await query.filter(name__iendswith="0%").all()) == ["100%"]


async def test_q_objects_exclude_and_nulls(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query()
            either = await q.filter(Q(rank=1) | Q(name__startswith="G")).all()
            assert set(names(either)) == {"alpha", "Gamma"}
            # NOT (score > 10) keeps the NULL scores: conditions are two-valued.
            not_high = await q.exclude(score__gt=10).all()
            assert set(names(not_high)) == {"alpha", "beta", "delta", "100%", "epsilon"}
            nested = await q.filter(
                ~(Q(rank__lt=5) | Q(score__isnull=True)), Q(score__gte=55)
            ).all()
            assert names(nested) == ["aXb"]
            assert set(names(await q.filter(Q()).all())) == set(names(await q.all()))


async def test_relations_join_many_to_one_and_exists_for_to_many(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query()
            assert set(names(await q.filter(category__name="Tools").all())) == {
                "alpha",
                "beta",
                "epsilon",
            }
            # Outer join: items without a category read as NULL.
            assert set(names(await q.filter(category__name__isnull=True).all())) == {
                "delta",
                "100%",
                "aXb",
            }
            assert set(names(await q.exclude(category__name="Tools").all())) == {
                "Gamma",
                "delta",
                "100%",
                "a_b",
                "aXb",
            }
            # One-to-many: no duplicated roots although "epsilon" has two matching tags.
            tagged = await q.filter(tags__label__startswith="x").all()
            assert sorted(names(tagged)) == ["a_b", "alpha", "epsilon"]
            assert await q.filter(tags__label__startswith="x").count() == 3
            # Same AND node: one tag must satisfy both; separate filter() calls: any tags.
            same = await q.filter(tags__label="x2", tags__weight=1).all()
            assert names(same) == []
            separate = await q.filter(tags__label="x2").filter(tags__weight=1).all()
            assert names(separate) == ["epsilon"]
            # Many-to-many through the association table.
            assert set(names(await q.filter(groups__name="blue").all())) == {"beta", "delta"}
            # Mixed in OR with a join.
            mixed = await q.filter(Q(groups__name="blue") | Q(category__code="t1-toys")).all()
            assert set(names(mixed)) == {"beta", "delta", "Gamma", "a_b"}
            # Joined paths order and project too.
            rows = await q.filter(category__name="Toys").values_list("name", "category__code")
            assert rows == [("Gamma", "t1-toys"), ("a_b", "t1-toys")]


async def test_builders_are_immutable(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            base = uow.items.query()
            filtered = base.filter(rank__gte=5)
            ordered = filtered.order_by("-rank")
            limited = ordered.limit(2)
            joined = limited.filter(category__name="Toys")
            assert len(await base.all()) == 8
            assert len(await filtered.all()) == 4
            # Ties (rank 5) break on the primary key, in the last key's direction.
            assert names(await ordered.all()) == ["epsilon", "aXb", "a_b", "100%"]
            assert names(await limited.all()) == ["epsilon", "aXb"]
            assert names(await joined.all()) == ["a_b"]
            assert names(await limited.all()) == ["epsilon", "aXb"]  # parent kept no join


async def test_terminals(uow_factory: Factory) -> None:
    made = await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query()
            assert (await q.order_by("-score").first()).name in {"beta", "100%"}  # NULL largest
            assert (await q.order_by("score").first()).name == "epsilon"
            assert await q.filter(name="nope").first() is None
            assert (await q.filter(sku="A1").one()).id == made["alpha"].id
            with pytest.raises(NotFound):
                await q.filter(sku="nope").one()
            with pytest.raises(InvalidQuery):
                await q.filter(rank=2).one()
            assert await q.count() == 8
            assert await q.filter(rank=5).count() == 2
            assert await q.order_by("rank").offset(6).count() == 2
            assert await q.limit(3).count() == 3
            assert await q.filter(rank=9).exists()
            assert not await q.filter(rank=99).exists()
            assert await q.order_by("rank").values_list("rank", flat=True) == [
                1,
                2,
                2,
                3,
                5,
                5,
                8,
                9,
            ]
            assert sorted(await q.distinct().values_list("rank", flat=True)) == [1, 2, 3, 5, 8, 9]
            assert await q.order_by("rank").limit(2).values_list("sku", "rank") == [
                ("A1", 1),
                ("B1", 2),
            ]
            with pytest.raises(InvalidQuery):
                await q.values_list("rank", "sku", flat=True)
            with pytest.raises(InvalidQuery) as bad:
                await q.values_list("tags__label")
            assert bad.value.field == "tags__label"
            # Reading is not filtering: any mapped column, filterable or not (version).
            assert await q.order_by("rank").limit(2).values_list("sku", "version") == [
                ("A1", 1),
                ("B1", 1),
            ]
            assert await q.order_by("rank").limit(1).values("sku", "version", "rank") == [
                {"sku": "A1", "version": 1, "rank": 1}
            ]
            (whole,) = await q.filter(sku="A1").values()
            assert set(whole) == {a.key for a in inspect(models.Item).column_attrs}
            assert (whole["sku"], whole["deleted_at"]) == ("A1", None)
            assert await q.filter(sku="A1").values_list() == [tuple(whole.values())]
            with pytest.raises(InvalidQuery) as bad:
                await q.values("nope")
            assert bad.value.field == "nope"
            streamed = [item.name async for item in q.order_by("rank").stream(chunk_size=3)]
            assert streamed == names(await q.order_by("rank").all())


async def test_load_lines_for_100_orders_takes_two_selects(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            await uow.orders.add_many([new_order(f"c{i:03}", "A", "B") for i in range(100)])
            await uow.commit()
        async with uow_factory() as uow:
            with statements(engine) as seen:
                orders = await uow.orders.query().order_by("customer").load("lines").all()
                total_lines = sum(len(order.lines) for order in orders)
            selects = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
    assert len(orders) == 100 and total_lines == 200
    assert len(selects) <= 2, selects


async def test_add_many_writes_each_table_in_one_statement(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            await uow.orders.add_many([new_order(f"c{i}", "A", "B", "C") for i in range(50)])
            with statements(engine) as seen:
                await uow.commit()
    inserts = [s for s in seen if s.lstrip().upper().startswith("INSERT")]
    # The commit marker (an SQLite file's bookkeeping, one per transaction) is not the flush's.
    tables = [s.split()[2].strip('"') for s in inserts if "qx_commit" not in s]
    assert sorted(tables) == ["order_lines", "orders", "qx_outbox"], inserts


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda q: q.filter(secret=1), "secret"),
        (lambda q: q.filter(version=1), "version"),  # a column, but not filterable
        (lambda q: q.filter(rank__gtx=1), "rank__gtx"),
        (lambda q: q.filter(rank="high"), "rank"),
        (lambda q: q.filter(rank__in=[1, "x"]), "rank"),
        (lambda q: q.filter(rank__in=[1, None]), "rank"),
        (lambda q: q.filter(rank__range=[1]), "rank"),
        (lambda q: q.filter(rank__gt=None), "rank"),
        (lambda q: q.filter(rank__contains="1"), "rank"),
        (lambda q: q.filter(score__isnull="maybe"), "score"),
        (lambda q: q.filter(tags="x"), "tags"),
        (lambda q: q.filter(tags__nope="x"), "tags__nope"),
        (lambda q: q.filter(category__name=5), "category__name"),
        (lambda q: q.filter(**{"": 1}), ""),
        (lambda q: q.filter(name__=1), "name__"),
        (lambda q: q.order_by("version"), "version"),
        (lambda q: q.order_by("tags"), "tags"),
        (lambda q: q.order_by("rank", "-rank"), "rank"),
        (lambda q: q.limit(-1), "limit"),
        (lambda q: q.limit(5000), "limit"),
        (lambda q: q.offset("2"), "offset"),
        (lambda q: q.load("name"), "name"),
    ],
)
async def test_bad_input_raises_invalid_query_naming_the_culprit(
    uow_factory: Factory, build: Any, field: str
) -> None:
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            with pytest.raises(InvalidQuery) as info:
                build(uow.items.query())
    assert info.value.field == field


async def test_in_lookup_empty_and_huge(uow_factory: Factory) -> None:
    made = await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query()
            assert await q.filter(name__in=[]).all() == []
            assert len(await q.exclude(name__in=[]).all()) == 8
            many = [f"n{i}" for i in range(50_000)] + ["beta"]
            assert names(await q.filter(name__in=many).all()) == ["beta"]
            ids = [made["alpha"].id, *(new_id() for _ in range(50_000))]
            found = await uow.items.in_bulk(ids)
            assert list(found) == [made["alpha"].id]
            ranks = [*list(range(100, 50100)), 9]
            assert names(await q.filter(rank__in=ranks).all()) == ["epsilon"]


async def test_list_with_string_filters_and_sort(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            found = await uow.items.list(
                filters={"rank__gte": "2", "score__isnull": "false", "category__name": "Toys"},
                sort=["-rank"],
            )
            assert names(found) == ["a_b", "Gamma"]
            assert names(await uow.items.list(sort="-rank,name", limit=3)) == [
                "epsilon",
                "aXb",
                "100%",
            ]
            assert await uow.items.count(filters={"tags__label": "x"}) == 3
            with pytest.raises(InvalidQuery) as info:
                await uow.items.list(filters={"rank__gte": "two"})
            assert info.value.field == "rank"
            with pytest.raises(InvalidQuery):
                await uow.items.list(filters=["rank"])  # type: ignore[arg-type]


async def test_keyset_pages_forward_and_backward(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query().order_by("-score", "rank")
            expected = names(await q.all())
            pages, cursor = [], None
            while True:
                page = await q.page(page_size=3, cursor=cursor, with_total=True)
                pages.append(page)
                assert page.total == 8
                if not page.has_next:
                    break
                cursor = page.next_cursor
            assert [names(p.items) for p in pages] == [expected[0:3], expected[3:6], expected[6:8]]
            assert not pages[0].has_previous and pages[0].prev_cursor is None
            back = await q.page(page_size=3, cursor=pages[-1].prev_cursor)
            assert names(back.items) == expected[3:6] and back.has_next and back.has_previous
            first = await q.page(page_size=3, cursor=back.prev_cursor)
            assert names(first.items) == expected[0:3] and not first.has_previous
            offset = await q.page(page_size=3, page_number=3, with_total=True)
            assert names(offset.items) == expected[6:8]
            assert offset.has_previous and not offset.has_next and offset.total == 8


async def test_bad_cursors(uow_factory: Factory, session_factory: Any) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query().order_by("rank")
            token = (await q.page(page_size=2)).next_cursor
            assert token is not None
            body, _, tag = token.partition(".")
            for bad in (
                token[:-3],
                token + "x",
                body,
                f"{body}.{tag[::-1]}",
                "",
                "!!!.@@@",
                "a" * 5000,
            ):
                with pytest.raises(InvalidCursor):
                    await q.page(page_size=2, cursor=bad)
            with pytest.raises(InvalidCursor):
                await q.order_by("-rank").page(page_size=2, cursor=token)  # other sort
            with pytest.raises(InvalidQuery):
                await q.page(page_size=2, cursor=token, page_number=1)
            with pytest.raises(InvalidQuery):
                await q.limit(2).page(page_size=2)
        other = UnitOfWorkFactory(
            models.AppUnitOfWork, session_factory, cursor_secret="another-secret-0123456789"
        )
        async with other() as uow:
            with pytest.raises(InvalidCursor):
                await uow.items.query().order_by("rank").page(page_size=2, cursor=token)
        unsigned = UnitOfWorkFactory(models.AppUnitOfWork, session_factory)
        async with unsigned() as uow:
            with pytest.raises(ConfigurationError):
                await uow.items.query().page(page_size=2)
            offset = await uow.items.query().page(page_size=2, page_number=1)
            assert len(offset.items) == 2
    with pytest.raises(ConfigurationError):
        UnitOfWorkFactory(models.AppUnitOfWork, session_factory, cursor_secret="short")


async def test_bulk_update_bumps_versions_and_returns(uow_factory: Factory) -> None:
    made = await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            assert await uow.items.query().filter(rank=5).update(score=7) == 2
            changed = (
                await uow.items.query()
                .filter(category__name="Toys")
                .update(returning=True, price="9.99")
            )
            assert sorted(names(changed)) == ["Gamma", "a_b"]
            assert all(item.price == Decimal("9.99") for item in changed)
            await uow.commit()
        async with uow_factory() as uow:
            a_b = await uow.items.require(made["a_b"].id)
            assert (a_b.score, a_b.price, a_b.version) == (7, Decimal("9.99"), 3)
            assert a_b.updated_at is not None and a_b.updated_at > made["a_b"].updated_at
            for bad, field in (
                ({"version": 3}, "version"),
                ({"tenant_id": "t2"}, "tenant_id"),
                ({"rank": None}, "rank"),
                ({"nope": 1}, "nope"),
                ({"rank": "x"}, "rank"),
            ):
                with pytest.raises(InvalidQuery) as info:
                    await uow.items.query().update(**bad)
                assert info.value.field == field


@pytest.mark.postgres_only  # SQLite serializes the two writers instead
async def test_bulk_update_conflicts_with_a_stale_loaded_copy(uow_factory: Factory) -> None:
    made = await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as writer:
            stale = await writer.items.require(made["alpha"].id)
            async with uow_factory() as bulk:
                await bulk.items.query().filter(sku="A1").update(rank=100)
                await bulk.commit()
            stale.score = 1
            from qx.errors import ConcurrencyConflict

            with pytest.raises(ConcurrencyConflict):
                await writer.commit()


async def test_bulk_delete_soft_and_hard(uow_factory: Factory, engine: AsyncEngine) -> None:
    await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            assert await uow.items.query().filter(rank__gte=8).delete() == 2
            await uow.commit()
        async with uow_factory() as uow:
            assert await uow.items.count() == 6
            assert await uow.items.query().with_deleted().count() == 8
            # Deleting again keeps the first deleted_at: already-deleted rows are not matched.
            assert await uow.items.query().with_deleted().filter(rank__gte=8).delete() == 0
            # Hard delete removes owned tags and association rows first (no FK cascade).
            # "epsilon" is red too, but soft-deleted: invisible, so untouched.
            gone = await uow.items.query().filter(groups__name="red").delete(hard=True)
            assert gone == 2
            await uow.commit()
    async with engine.connect() as conn:
        tags = await conn.scalar(select(func.count()).select_from(models.item_tags))
        links = await conn.scalar(select(func.count()).select_from(models.item_groups))
        rows = await conn.scalar(select(func.count()).select_from(models.items))
    assert (rows, tags, links) == (6, 4, 2)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            assert await uow.counters.query().delete() == 0  # no deleted_at: a real DELETE
            await uow.counters.add_many(
                [models.Counter(name=n, value=v) for n, v in (("a", 0), ("b", 1))]
            )
            removed = await uow.counters.query().filter(value=0).delete(returning=True)
            assert [c.name for c in removed] == ["a"]
            soft = await uow.items.query().filter(sku="D1").delete(returning=True)
            assert [i.sku for i in soft] == ["D1"] and soft[0].deleted_at is not None
            await uow.commit()
        async with uow_factory() as uow:
            assert [c.name for c in await uow.counters.list()] == ["b"]
            assert not await uow.items.exists(sku="D1")


async def test_upsert(uow_factory: Factory) -> None:
    made = await seed(uow_factory)
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            stored = await uow.items.upsert(
                [Item(name="ALPHA", sku="A1", rank=11), Item(name="new", sku="N1", rank=12)],
                conflict=["sku"],
                update=["name", "rank"],
            )
            assert sorted(names(stored)) == ["ALPHA", "new"]
            await uow.commit()
        async with uow_factory() as uow:
            alpha = await uow.items.require(made["alpha"].id)
            assert (alpha.name, alpha.rank, alpha.version, alpha.score) == ("ALPHA", 11, 2, 10)
            new = await uow.items.query().filter(sku="N1").one()
            assert (new.tenant_id, new.version) == ("t1", 1)
            assert await uow.items.upsert([], conflict=["sku"]) == []
            for kwargs, field in (
                ({"conflict": ["name"]}, "conflict"),
                ({"conflict": ["nope"]}, "conflict"),
                ({"conflict": ["sku"], "update": ["version"]}, "update"),
                ({"conflict": ["sku"], "update": ["tags"]}, "update"),
            ):
                with pytest.raises(InvalidQuery) as info:
                    await uow.items.upsert([Item(name="z", sku="Z1")], **kwargs)
                assert info.value.field == field
            with pytest.raises(InvalidQuery) as info:
                await uow.items.upsert(
                    [Item(name="z", sku="Z1", tags=[Tag(label="q")])], conflict=["sku"]
                )
            assert info.value.field == "tags"


async def test_get_or_create_and_update_or_create(uow_factory: Factory) -> None:
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            first, created = await uow.categories.get_or_create(
                code="c-1", defaults={"name": "One"}
            )
            assert created and first.tenant_id == "t1"
            again, created_again = await uow.categories.get_or_create(
                code="c-1", defaults={"name": "x"}
            )
            assert again is first and not created_again
            await uow.commit()
        async with uow_factory() as uow:
            updated, created = await uow.categories.update_or_create(
                code="c-1", defaults={"name": "Uno"}
            )
            assert not created and updated.name == "Uno"
            made, created = await uow.categories.update_or_create(
                code="c-2", defaults={"name": "Two"}
            )
            assert created and made.name == "Two"
            await uow.commit()
        async with uow_factory() as uow:
            assert await uow.categories.query().order_by("code").values_list("name", flat=True) == [
                "Uno",
                "Two",
            ]
            with pytest.raises(InvalidQuery):
                await uow.categories.get_or_create(defaults={"name": "x"})
            with pytest.raises(InvalidQuery) as info:
                await uow.categories.get_or_create(code="c-3", defaults={"nope": 1})
            assert info.value.field == "nope"
            with pytest.raises(InvalidQuery):
                await uow.categories.get_or_create(code="c-3")  # name is required


async def test_get_or_create_is_safe_under_concurrency(uow_factory: Factory) -> None:
    import asyncio

    async def one() -> tuple[Any, bool]:
        with request_context(tenant_id="t1"):
            async with uow_factory() as uow:
                found, created = await uow.categories.get_or_create(
                    code="race", defaults={"name": "R"}
                )
                await uow.commit()
                return found.id, created

    results = await asyncio.gather(*(one() for _ in range(20)))
    assert len({ident for ident, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            assert await uow.categories.count(code="race") == 1


async def test_tenant_isolation_for_every_terminal(
    uow_factory: Factory, engine: AsyncEngine
) -> None:
    theirs = await seed(uow_factory, tenant="t2")
    ours = await seed(uow_factory, tenant="t1")
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query()
            assert len(await q.all()) == 8
            assert await q.count() == 8
            assert not await q.filter(sku="A1", category__code="t2-tools").exists()
            assert await q.filter(sku="A1", category__code="t1-tools").exists()
            assert all(i.tenant_id == "t1" for i in await q.filter(tags__label="x").all())
            assert set(
                await q.filter(category__name="Tools").values_list("category__code", flat=True)
            ) == {"t1-tools"}
            streamed = [i async for i in q.stream(chunk_size=2)]
            assert len(streamed) == 8 and {i.tenant_id for i in streamed} == {"t1"}
            page = await q.page(page_size=50)
            assert len(page.items) == 8
            bulk = await uow.items.in_bulk([theirs["alpha"].id, ours["alpha"].id])
            assert list(bulk) == [ours["alpha"].id]
            assert await q.update(rank=0) == 8
            assert await q.filter(rank=0).delete() == 8
            stored = await uow.items.upsert([Item(name="up", sku="A1", rank=1)], conflict=["sku"])
            assert [i.tenant_id for i in stored] == ["t1"]
            # Another tenant's globally unique category code: neither visible nor created.
            from qx.errors import DuplicateKey, TenantViolation

            with pytest.raises(DuplicateKey):
                await uow.categories.get_or_create(code="t2-tools", defaults={"name": "mine"})
            with pytest.raises(TenantViolation):
                await uow.categories.upsert(
                    [Category(code="t2-tools", name="mine")], conflict=["code"]
                )
            await uow.rollback()
    with request_context(tenant_id="t2"):
        async with uow_factory() as uow:
            untouched = await uow.items.query().order_by("rank").values_list("rank", flat=True)
            assert untouched == [1, 2, 2, 3, 5, 5, 8, 9]
            assert (await uow.categories.query().filter(code="t2-tools").one()).name == "Tools"


async def test_relation_lookups_never_reach_another_tenants_rows(uow_factory: Factory) -> None:
    theirs = await seed(uow_factory, tenant="t2")
    ours = await seed(uow_factory, tenant="t1")
    with system_context():
        async with uow_factory() as uow:
            # A corrupt cross-tenant link: our item points at their category, tag and group.
            delta = await uow.items.require(ours["delta"].id)
            their_alpha = await uow.items.require(theirs["alpha"].id)
            delta.category_id = their_alpha.category_id
            await uow.commit()
    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            q = uow.items.query()
            tools = await q.filter(category__name="Tools").all()
            assert ours["delta"].id not in {i.id for i in tools}
            assert await q.filter(category__code="t2-tools").count() == 0
            codes = await q.filter(sku="D1").values_list("category__code", flat=True)
            assert codes == [None]
            # EXISTS subqueries are scoped too: their tags never match our items.
            assert await q.filter(tags__label="y").count() == 2


async def test_stream_keeps_memory_flat(uow_factory: Factory) -> None:
    import gc

    with request_context(tenant_id="t1"):
        async with uow_factory() as uow:
            await uow.orders.add_many([new_order(f"c{i:04}", "A") for i in range(3000)])
            await uow.commit()
        async with uow_factory() as uow:
            tracked, seen = 0, 0
            async for _order in uow.orders.query().order_by("customer").stream(chunk_size=200):
                seen += 1
                if seen % 500 == 0:
                    gc.collect()
                    tracked = max(tracked, len(uow.session.sync_session.identity_map))
            assert seen == 3000
            # Rows already yielded are not kept: at most a chunk or two of orders and lines.
            assert tracked <= 2 * 200 * 2
