"""Every input to the HTTP-facing query surface is answered with a qx error or a right answer.

The inputs that once escaped as raw exceptions, each an explicit case, on every backend; then
a hypothesis fuzz over ``list(filters=..., sort=...)``, query builders, cursors and bulk
``update`` values that fails on any exception outside ``QxError``. Messages quote at most a
bounded part of the offending input.
"""

from __future__ import annotations

import base64
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import reduce
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, String, Table

from qx.core import AggregateRoot, new_id, request_context
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    make_metadata,
    make_registry,
    map_aggregate,
    uuid_pk,
    version_column,
)
from qx.db.query import Q
from qx.errors import InvalidCursor, InvalidQuery, QxError
from tests import models
from tests.integration.conftest import own_domain
from tests.models import Item, Tag

TENANT = "hostile"
Factory = UnitOfWorkFactory[models.AppUnitOfWork]
MESSAGE_LIMIT = 600  # characters: the offending input is quoted in part only


async def seed(factory: Factory) -> None:
    with request_context(tenant_id=TENANT):
        async with factory() as uow:
            for i in range(6):
                await uow.items.add(
                    Item(name=f"n{i}", sku=f"s{i}", rank=i, score=i, tags=[Tag(label=f"t{i}")])
                )
            await uow.commit()


def bounded(error: BaseException) -> None:
    assert isinstance(error, QxError), repr(error)
    assert len(str(error)) <= MESSAGE_LIMIT, len(str(error))


async def refused(call: Callable[[], Awaitable[Any]], kind: type[QxError] = InvalidQuery) -> str:
    with pytest.raises(QxError) as caught:
        await call()
    bounded(caught.value)
    assert isinstance(caught.value, kind), repr(caught.value)
    return str(caught.value)


BAD_FILTERS: list[dict[Any, Any]] = [
    {"rank": "--5"},
    {"rank": "+-5"},
    {"rank": "²"},
    {"rank": "١٢"},  # Arabic-Indic digits are not an integer here
    {"rank__in": "1,²"},
    {"created_at__gte": "0001-01-01T00:00:00+01:00"},
    {"created_at__lte": "9999-12-31T23:59:59-01:00"},
    {"price": "1" * 1_000_000},
    {"price__gte": "1e999999"},
    {"name": "\ud800"},
    {"name__icontains": "a\udfffb"},
    {"name__contains": "x" * 60_000},
    {1: "x"},
    {"name" * 10_000: "x"},
    {"tags__label__istartswith": "%" * 70_000},
]


@pytest.mark.parametrize("filters", BAD_FILTERS, ids=lambda f: repr(f)[:40])
async def test_bad_filter_values_are_invalid_query(
    uow_factory: Factory, filters: dict[Any, Any]
) -> None:
    await seed(uow_factory)
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            await refused(lambda: uow.items.list(filters=filters))
            await refused(lambda: uow.items.count(filters=filters))


async def test_bad_windows_and_sorts_are_invalid_query(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            await refused(lambda: uow.items.list(offset=2**63))
            await refused(lambda: uow.items.list(limit=True))
            await refused(lambda: uow.items.page(page_number=2**62))
            await refused(lambda: uow.items.page(page_number=2**40, page_size=1000))
            message = await refused(lambda: uow.items.list(sort="s" * 2**20))
            assert message.count("s") < 300
            await refused(lambda: uow.items.list(sort="\ud800"))
            await refused(lambda: uow.items.list(sort=["name", 7]))
            # Not a string nor a list of them (a TypeError escaped for these).
            for sort in (5, 2.5, True, b"name", {"name"}, {"name": 1}, object()):
                assert "sort" in await refused(lambda s=sort: uow.items.list(sort=s))
                assert "sort" in await refused(lambda s=sort: uow.items.list(order_by=s))
                assert "sort" in await refused(lambda s=sort: uow.items.page(sort=s))


async def test_deep_and_wide_q_trees_are_answered(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            # A common pattern: OR of many equalities on one field means IN.
            many = reduce(operator.or_, [Q(rank=i) for i in range(1000)])
            assert len(await uow.items.query().filter(many).all()) == 6
            many_skus = reduce(operator.or_, [Q(sku=f"s{i}") for i in range(5000)])
            assert await uow.items.query().filter(many_skus).count() == 6
            both = reduce(operator.and_, [Q(rank__gte=0) for _ in range(10)])
            assert await uow.items.query().filter(both).count() == 6
            flipped = Q(rank=1)
            for _ in range(1001):
                flipped = ~flipped  # one node, negated or not: no depth to speak of
            assert [i.rank for i in await uow.items.query().filter(flipped).all()] == [
                0, 2, 3, 4, 5
            ]  # fmt: skip
            nested = Q(rank=1)
            for _ in range(2000):
                nested = Q(nested, Q(name="n1") | Q(sku="s1"))
            with pytest.raises(InvalidQuery) as caught:
                uow.items.query().filter(nested)
            bounded(caught.value)
            negated = Q(rank=1)
            for _ in range(1000):
                negated = ~Q(negated, sku="x")
            with pytest.raises(InvalidQuery):
                uow.items.query().filter(negated)
            wide = [Q(rank__ne=i, name__ne=f"x{i}") for i in range(1000)]
            with pytest.raises(InvalidQuery):
                uow.items.query().filter(*wide)


async def test_cursors_with_hostile_values_are_invalid_cursor(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            page = await uow.items.page(sort="created_at", page_size=2)
            assert page.next_cursor is not None
            codec = uow.cursor_codec
            assert codec is not None
            sort = "Item:created_at,id"
            for values in (
                ["0001-01-01T00:00:00+01:00", "01a23100-6e22-7130-89a0-0c3df4b3cda5"],
                ["\ud800", "x"],
                ["9999-12-31T23:59:59-01:00", "y" * 10_000],
            ):
                forged = codec.encode(sort=sort, backward=False, values=values)
                await refused(
                    lambda forged=forged: uow.items.page(sort="created_at", cursor=forged),
                    InvalidCursor,
                )
            for garbage in ("1", "\ud800", "x" * 100_000, "a.b.c"):
                await refused(lambda garbage=garbage: uow.items.page(cursor=garbage), InvalidCursor)


BAD_UPDATES: list[dict[str, Any]] = [
    {"rank": "١٢"},
    {"rank": "--5"},
    {"rank": 2**70},
    {"name": "\ud800"},
    {"price": "1" * 1_000_000},
    {"score": float("nan")},
    {"rank": True},
]


@pytest.mark.parametrize("values", BAD_UPDATES, ids=lambda v: repr(v)[:40])
async def test_bad_bulk_update_values_are_invalid_query(
    uow_factory: Factory, values: dict[str, Any]
) -> None:
    await seed(uow_factory)
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            await refused(lambda: uow.items.query().filter(rank=1).update(**values))


async def test_a_stored_value_matches_itself_and_its_case_variants(uow_factory: Factory) -> None:
    words = ["É", "ÅÄÖ", "İstanbul", "ΟΔΟΣ", "ǅemal", "ẞ", "\u212a", "Straße", "Ωmega", "file"]
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            for i, word in enumerate(words):
                await uow.items.add(Item(name=word, sku=f"w{i}"))
            await uow.commit()
        async with uow_factory() as uow:
            misses = []
            for word in words:
                for variant in {word, word.lower(), word.upper(), word.casefold(), word.title()}:
                    for lookup, probe in (
                        ("iexact", variant),
                        ("icontains", variant[1:] or variant),
                        ("istartswith", variant[:2]),
                        ("iendswith", variant[-2:]),
                    ):
                        names = (
                            await uow.items.query()
                            .filter(**{f"name__{lookup}": probe})
                            .values_list("name", flat=True)
                        )
                        if word not in names:
                            misses.append((word, lookup, probe))
            assert misses == []


# -- fuzz -------------------------------------------------------------------------------------

nasty_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "--5",
            "+-5",
            "²",
            "١٢",
            "\ud800",
            "a\udfffb",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "1e999999",
            "NaN",
            "-0",
            "0x10",
            "1_000",
            "\u0663.\u0665",
            "%",
            "_",
            "\\",
            '["a,b", 1]',
            "[",
            "null",
            "true",
        ]
    ),
    st.integers(min_value=2**62, max_value=2**70).map(str),
    st.just("9" * 5000),
)
nasty_values = st.one_of(
    nasty_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(nasty_text, max_size=3),
)
fields = st.sampled_from([*sorted(models.ItemRepository.filterable), "id", "version", "nope"])
lookups = st.sampled_from(["", "__in", "__range", "__gte", "__icontains", "__isnull", "__ne"])
filter_maps = st.dictionaries(st.builds(operator.add, fields, lookups), nasty_values, max_size=3)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(filters={"rank": "١٢"}, sort="\ud800", update={"rank": "--5"}, cursor="1")
@example(
    filters={"created_at__gte": "0001-01-01T00:00:00+01:00"}, sort=None, update={}, cursor=None
)
@given(
    filters=filter_maps,
    sort=st.none() | nasty_text | nasty_values | st.lists(nasty_text | nasty_values, max_size=3),
    update=st.dictionaries(st.sampled_from(["rank", "score", "name", "price"]), nasty_values, max_size=2),
    cursor=st.none() | nasty_text | st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode() + ".x"),
)  # fmt: skip
def test_fuzzed_inputs_raise_only_bounded_qx_errors(
    fuzz_database: Any, filters: Any, sort: Any, update: Any, cursor: Any
) -> None:
    async def body(factory: Any) -> None:
        with request_context(tenant_id=TENANT):
            async with factory() as uow:
                calls: list[Callable[[], Awaitable[Any]]] = [
                    lambda: uow.items.list(filters=filters, sort=sort),
                    lambda: uow.items.page(filters=filters, sort=sort, cursor=cursor),
                    lambda: uow.items.query().filter(**filters).values_list("name"),
                ]
                if update:
                    calls.append(lambda: uow.items.query().filter(rank=-1).update(**update))
                for call in calls:
                    try:
                        await call()
                    except QxError as error:
                        bounded(error)
                await uow.rollback()

    fuzz_database.run(body)


@pytest.fixture(scope="module", params=["memory", "sqlite", "postgresql"])
def fuzz_database(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Any:
    from pathlib import Path

    from tests.integration.property_support import prepared

    path = Path(tmp_path_factory.mktemp(f"hostile-{request.param}"))
    for database in prepared(request.param, path):
        yield database.seeded(seed)


async def test_in_takes_a_json_list_that_can_carry_commas(uow_factory: Factory) -> None:
    await seed(uow_factory)
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            await uow.items.add(Item(name="comma", sku="a,b"))
            await uow.commit()
        async with uow_factory() as uow:
            found = await uow.items.list(filters={"sku__in": '["a,b", "s1"]'}, sort="sku")
            assert [item.sku for item in found] == ["a,b", "s1"]
            plain = await uow.items.list(filters={"sku__in": "s1,s2"}, sort="sku")
            assert [item.sku for item in plain] == ["s1", "s2"]
            await refused(lambda: uow.items.list(filters={"sku__in": '["a", '}))


# -- every cursor qx issues is accepted back -----------------------------------------------


@dataclass(eq=False, kw_only=True)
class Memo(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    body: str
    version: int | None = None


memo_metadata = make_metadata()
memos = Table(
    "h_memos",
    memo_metadata,
    uuid_pk(),
    Column("body", String(4000), nullable=False),
    version_column(),
)
map_aggregate(make_registry(memo_metadata), Memo, memos)


class Memos(Repository[Memo]):
    sortable = frozenset({"body"})


class MemoUnitOfWork(UnitOfWork):
    memos: Memos


@pytest.fixture
async def memo_factory(backend: str, tmp_path: Any) -> Any:
    async with own_domain(
        backend, tmp_path, MemoUnitOfWork, memo_metadata, cursor_secret="hostile-cursor-secret"
    ) as (factory, _):
        yield factory


async def test_cursors_of_long_sort_values_are_accepted_back(memo_factory: Any) -> None:
    # Text that does not compress: its cursor names the row by key instead of by value.
    noisy = "0" + "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3998))
    bodies = [noisy, "a" * 3999, "b" + "é" * 3998, "c" + "\U0001f600" * 1500, "d" * 10]
    async with memo_factory() as uow:
        await uow.memos.add_many(Memo(body=body) for body in bodies)
        await uow.commit()
    async with memo_factory() as uow:
        seen: list[str] = []
        page = await uow.memos.page(sort="body", page_size=1)
        seen += [m.body for m in page.items]
        while page.next_cursor is not None:
            assert len(page.next_cursor) <= 4096
            page = await uow.memos.page(sort="body", page_size=1, cursor=page.next_cursor)
            seen += [m.body for m in page.items]
        assert seen == sorted(bodies)
        back = await uow.memos.page(sort="body", page_size=2, cursor=page.prev_cursor)
        assert [m.body for m in back.items] == sorted(bodies)[2:4]
    async with memo_factory() as uow:  # the boundary row is deleted: a clear error
        first = await uow.memos.page(sort="body", page_size=1)
        await uow.memos.hard_remove(first.items[0])
        await uow.commit()
    async with memo_factory() as uow:
        with pytest.raises(InvalidCursor, match="gone"):
            await uow.memos.page(sort="body", page_size=1, cursor=first.next_cursor)


async def test_isnull_on_a_relationship_means_has_no_related_rows(uow_factory: Factory) -> None:
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            await uow.items.add(Item(name="tagged", sku="t1", tags=[Tag(label="x")]))
            await uow.items.add(Item(name="bare", sku="t2"))
            await uow.commit()
        async with uow_factory() as uow:
            bare = await uow.items.list(filters={"tags__isnull": "true"})
            tagged = await uow.items.list(filters={"tags__isnull": "false"})
            assert [i.sku for i in bare] == ["t2"] and [i.sku for i in tagged] == ["t1"]
            no_category = await uow.items.query().filter(category__isnull=True).count()
            assert no_category == 2
            # ne on a to-many path: some related row differs (not "no related row equals").
            assert await uow.items.query().filter(tags__label__ne="y").count() == 1
            await refused(lambda: uow.items.list(filters={"tags__isnull": "maybe"}))


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque " + "o" * 2000 + ">"


#: A value of every wrong Python type (and some right types with wrong values).
WRONG_TYPES: list[Any] = [
    5, -1, 2.5, 10**40, True, None, float("nan"), float("inf"), 1j,
    b"name", bytearray(b"name"), "", "\x00", "x" * 5000,
    [], [5], [None], ["name", 5], [[1]], ("name", 5),
    {}, {"a": 1}, {5: 1}, {"name": [1]}, {"name"}, frozenset({1}), range(3),
    _Opaque(), len, type, Ellipsis,
]  # fmt: skip


def _collect(values: Any) -> Callable[[Any], Awaitable[Any]]:
    async def drain(iterator: Any) -> None:
        async for _ in iterator:
            pass

    return drain


async def test_every_wrong_type_for_every_parameter_is_a_bounded_qx_error(
    uow_factory: Factory,
) -> None:
    # Each parameter of list(), count(), exists(), page(), in_bulk(), stream(), get() and
    # the query builders, given a value of every wrong type: a right answer or a bounded
    # QxError, never a TypeError (list(sort=5) escaped as one).
    await seed(uow_factory)
    drain = _collect(None)
    escaped: list[str] = []
    with request_context(tenant_id=TENANT):
        async with uow_factory() as uow:
            items = uow.items
            calls: dict[str, Callable[[Any], Awaitable[Any]]] = {
                "list(filters)": lambda v: items.list(filters=v),
                "list(filters={name: v})": lambda v: items.list(filters={"name": v}),
                "list(name__in=v)": lambda v: items.list(name__in=v),
                "list(rank__gte=v)": lambda v: items.list(rank__gte=v),
                "list(sort)": lambda v: items.list(sort=v),
                "list(order_by)": lambda v: items.list(order_by=v),
                "list(limit)": lambda v: items.list(limit=v),
                "list(offset)": lambda v: items.list(offset=v),
                "list(with_deleted)": lambda v: items.list(with_deleted=v),
                "count(filters)": lambda v: items.count(filters=v),
                "exists(filters)": lambda v: items.exists(filters=v),
                "page(filters)": lambda v: items.page(filters=v),
                "page(sort)": lambda v: items.page(sort=v),
                "page(page_size)": lambda v: items.page(page_size=v),
                "page(cursor)": lambda v: items.page(cursor=v),
                "page(page_number)": lambda v: items.page(page_number=v),
                "in_bulk(ids)": lambda v: items.in_bulk(v),
                "stream(sort)": lambda v: drain(items.stream(sort=v)),
                "stream(chunk_size)": lambda v: drain(items.stream(chunk_size=v)),
                "get(id)": lambda v: items.get(v),
                "query().filter(v)": lambda v: items.query().filter(v).all(),
                "query().exclude(v)": lambda v: items.query().exclude(v).all(),
                "query().order_by(v)": lambda v: items.query().order_by(v).all(),
                "query().limit(v)": lambda v: items.query().limit(v).all(),
                "query().offset(v)": lambda v: items.query().offset(v).all(),
                "query().load(v)": lambda v: items.query().load(v).all(),
                "query().values_list(v)": lambda v: items.query().values_list(v),
                "query().by_keys(v)": lambda v: items.query().by_keys(v),
                "query().page(cursor)": lambda v: items.query().page(cursor=v),
            }
            for name, call in calls.items():
                for value in WRONG_TYPES:
                    try:
                        await call(value)
                    except QxError as error:
                        bounded(error)
                    except Exception as error:
                        escaped.append(f"{name} with {type(value).__name__}: {error!r}"[:200])
            await uow.rollback()
    assert escaped == [], "\n".join(escaped)
