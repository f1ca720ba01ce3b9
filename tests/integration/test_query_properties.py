"""Property tests on every backend: keyset pages tile the full result; SQL filters agree with
an independent Python evaluation of the same expression."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from decimal import Decimal
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qx.core import request_context
from qx.db.query import Q
from tests.integration.conftest import BACKENDS
from tests.integration.property_support import Database, clear_catalog, prepared
from tests.models import Category, Item, Tag

TENANT = "prop"
EXAMPLES = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", params=BACKENDS)
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    yield from prepared(request.param, Path(tmp_path_factory.mktemp(f"prop-{request.param}")))


rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["a", "b", "ab", "B", "a_", "%b", "ba"]),
            "rank": st.integers(0, 3),
            "score": st.none() | st.integers(-2, 2),
            "price": st.none() | st.sampled_from([Decimal("1.00"), Decimal("2.50")]),
            "category": st.sampled_from([None, "Tools", "Toys"]),
            "tags": st.lists(st.sampled_from(["x", "y", "xy", "z_"]), max_size=3),
        }
    ),
    max_size=25,
)


async def insert(factory: Any, rows: list[dict[str, Any]]) -> None:
    await clear_catalog(factory)
    await add_items(factory, rows)


async def add_items(factory: Any, rows: list[dict[str, Any]]) -> None:
    """Commit one Item (sku ``s<i>``) per generated row, with its tags and category."""
    with request_context(tenant_id=TENANT):
        async with factory() as uow:
            cats = {name: Category(code=name, name=name) for name in ("Tools", "Toys")}
            for i, row in enumerate(rows):
                data = dict(row)
                tags = [Tag(label=label) for label in data.pop("tags")]
                category = data.pop("category")
                await uow.items.add(
                    Item(
                        **data,
                        sku=f"s{i}",
                        tags=tags,
                        category=cats[category] if category else None,
                    )
                )
            await uow.commit()


sort_strategy = st.lists(
    st.sampled_from(["name", "-name", "rank", "-rank", "score", "-score", "price", "-price"]),
    max_size=3,
    unique_by=lambda key: key.lstrip("-"),
)


@EXAMPLES
@given(rows=rows_strategy, sort=sort_strategy, size=st.integers(1, 6))
def test_keyset_pages_tile_the_unpaginated_result(
    database: Database, rows: list[dict[str, Any]], sort: list[str], size: int
) -> None:
    async def body(factory: Any) -> None:
        await insert(factory, rows)
        with request_context(tenant_id=TENANT):
            async with factory() as uow:
                query = uow.items.query().order_by(*sort) if sort else uow.items.query()
                expected = [item.sku for item in await query.all()]
                assert [item.sku for item in await query.untracked().all()] == expected
                forward, cursor, pages = [], None, []
                while True:
                    page = await query.page(page_size=size, cursor=cursor)
                    assert len(page.items) <= size
                    pages.append(page)
                    forward.extend(item.sku for item in page.items)
                    if not page.has_next:
                        break
                    assert len(page.items) == size and page.next_cursor
                    cursor = page.next_cursor
                assert forward == expected
                backward: list[str] = []
                cursor = pages[-1].prev_cursor
                while cursor is not None:
                    page = await query.page(page_size=size, cursor=cursor)
                    assert len(page.items) == size
                    backward[:0] = [item.sku for item in page.items]
                    cursor = page.prev_cursor if page.has_previous else None
                assert backward + [item.sku for item in pages[-1].items] == expected

    database.run(body)


# -- random filter expressions vs an independent Python oracle ------------------------------

leaf_strategy = st.one_of(
    st.tuples(
        st.just("name"),
        st.sampled_from(
            ["exact", "iexact", "ne", "contains", "icontains", "startswith", "endswith"]
        ),
        st.sampled_from(["a", "b", "A", "_", "%", "ab", "B"]),
    ),
    st.tuples(
        st.just("name"),
        st.just("in"),
        st.lists(st.sampled_from(["a", "b", "ab", "zz"]), max_size=3),
    ),
    st.tuples(
        st.sampled_from(["rank", "score"]),
        st.sampled_from(["exact", "ne", "gt", "gte", "lt", "lte"]),
        st.integers(-2, 3),
    ),
    st.tuples(
        st.sampled_from(["rank", "score"]), st.just("in"), st.lists(st.integers(-2, 3), max_size=3)
    ),
    st.tuples(
        st.sampled_from(["rank", "score"]),
        st.just("range"),
        st.tuples(st.integers(-2, 3), st.integers(-2, 3)),
    ),
    st.tuples(
        st.sampled_from(["score", "price", "category__name"]), st.just("isnull"), st.booleans()
    ),
    st.tuples(
        st.just("price"),
        st.sampled_from(["gt", "lte", "exact"]),
        st.sampled_from([Decimal("1.00"), Decimal("2.00")]),
    ),
    st.tuples(
        st.just("category__name"),
        st.sampled_from(["exact", "ne"]),
        st.sampled_from(["Tools", "Toys"]),
    ),
    st.tuples(
        st.just("tags__label"),
        st.sampled_from(["exact", "contains", "startswith"]),
        st.sampled_from(["x", "y", "_", "z"]),
    ),
)


def _q(leaf: tuple[str, str, Any]) -> Q:
    field, lookup, value = leaf
    return Q(**{f"{field}__{lookup}": value})


expr_strategy = st.recursive(
    leaf_strategy,
    lambda children: st.one_of(
        st.tuples(st.just("and"), st.lists(children, min_size=1, max_size=3)),
        st.tuples(st.just("or"), st.lists(children, min_size=1, max_size=3)),
        st.tuples(st.just("not"), children),
    ),
    max_leaves=6,
)


def to_q(expr: Any) -> Q:
    if expr[0] == "and":
        return reduce(operator.and_, [to_q(e) for e in expr[1]])
    if expr[0] == "or":
        return reduce(operator.or_, [to_q(e) for e in expr[1]])
    if expr[0] == "not":
        return ~to_q(expr[1])
    return _q(expr)


def _match(lookup: str, x: Any, v: Any) -> bool:
    """The documented meaning of each lookup, written independently of qx."""
    if lookup == "isnull":
        return (x is None) == v
    if lookup == "ne":
        return x != v
    if x is None:
        return False
    if lookup == "exact":
        return bool(x == v)
    if lookup == "iexact":
        return bool(x.lower() == v.lower())
    if lookup == "contains":
        return v in x
    if lookup == "icontains":
        return v.lower() in x.lower()
    if lookup == "startswith":
        return bool(x.startswith(v))
    if lookup == "endswith":
        return bool(x.endswith(v))
    if lookup == "in":
        return x in v
    if lookup == "range":
        return bool(v[0] <= x <= v[1])
    return bool(
        {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}[lookup](x, v)
    )


def flattened(expr: Any) -> Any:
    """The tree as one ``filter()`` call sees it: a node of the same connector, or of one
    child, inside another says the same one level up (NOT nodes stay)."""
    if expr[0] == "not":
        return ("not", flattened(expr[1]))
    if expr[0] not in ("and", "or"):
        return expr
    children: list[Any] = []
    for child in (flattened(e) for e in expr[1]):
        if child[0] in ("and", "or") and (child[0] == expr[0] or len(child[1]) == 1):
            children.extend(child[1])
        else:
            children.append(child)
    return (expr[0], children)


def oracle(expr: Any, row: dict[str, Any]) -> bool:
    return _holds(flattened(expr), row)


def _holds(expr: Any, row: dict[str, Any]) -> bool:
    if expr[0] == "and":
        # The documented rule: conditions ANDed in one filter() on the same to-many
        # relationship must hold for the same related row (as in Django).
        tag_leaves = [e for e in expr[1] if e[0] == "tags__label"]
        others = [e for e in expr[1] if e[0] != "tags__label"]
        tags_ok = not tag_leaves or any(
            all(_match(lookup, tag, value) for _, lookup, value in tag_leaves)
            for tag in row["tags"]
        )
        return tags_ok and all(_holds(e, row) for e in others)
    if expr[0] == "or":
        return any(_holds(e, row) for e in expr[1])
    if expr[0] == "not":
        return not _holds(expr[1], row)
    field, lookup, value = expr
    if field == "tags__label":
        return any(_match(lookup, tag, value) for tag in row["tags"])
    if field == "category__name":
        return _match(lookup, row["category"], value)
    return _match(lookup, row[field], value)


@EXAMPLES
@given(rows=rows_strategy, expr=expr_strategy)
def test_filters_agree_with_python_evaluation(
    database: Database, rows: list[dict[str, Any]], expr: Any
) -> None:
    async def body(factory: Any) -> None:
        await insert(factory, rows)
        with request_context(tenant_id=TENANT):
            async with factory() as uow:
                found = await uow.items.query().filter(to_q(expr)).values_list("sku", flat=True)
                # The same rows untracked, each with its own parts (in the relationship's
                # order: by label).
                untracked = await uow.items.query().filter(to_q(expr)).untracked().all()
        expected = {f"s{i}" for i, row in enumerate(rows) if oracle(expr, row)}
        assert set(found) == expected
        assert len(found) == len(set(found))  # relation filters never duplicate roots
        assert sorted(item.sku for item in untracked) == sorted(found)
        for item in untracked:
            stored = rows[int(item.sku[1:])]
            assert [tag.label for tag in item.tags] == sorted(stored["tags"])

    database.run(body)
