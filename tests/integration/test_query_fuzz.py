"""Fuzzing the HTTP-facing query surface: garbage in raises only qx errors, changes nothing."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from qx.core import request_context, system_context
from qx.errors import QxError
from tests import models
from tests.integration.conftest import BACKENDS
from tests.integration.property_support import Database, prepared
from tests.models import Item, Tag

TENANT = "fuzz"
FIELDS = sorted(models.ItemRepository.filterable | {"version", "tenant_id", "tags", "nope", "id"})
LOOKUP_NAMES = ["", "exact", "in", "range", "isnull", "gt", "icontains", "ne", "bogus", "lines"]


@pytest.fixture(scope="module", params=BACKENDS)
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    path = Path(tmp_path_factory.mktemp(f"fuzz-{request.param}"))
    for database in prepared(request.param, path):

        async def seed(factory: Any) -> None:
            with request_context(tenant_id=TENANT):
                async with factory() as uow:
                    for i in range(12):
                        await uow.items.add(
                            Item(
                                name=f"n{i % 4}",
                                sku=f"s{i}",
                                rank=i % 3,
                                score=None if i % 5 else i,
                                tags=[Tag(label=f"t{i % 2}")],
                            )
                        )
                    await uow.commit()

        yield database.seeded(seed)


keys = st.one_of(
    st.builds(
        lambda f, lk: f"{f}__{lk}" if lk else f,
        st.sampled_from(FIELDS),
        st.sampled_from(LOOKUP_NAMES),
    ),
    st.text(max_size=30),
)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([2**31, -(2**63) - 1, 2**70, "1e400", "NaN", "\x00", "1,2", "true"])
    | st.binary(max_size=8)
    | st.decimals()
    | st.datetimes()
    | st.uuids(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=6,
)
sorts = (
    st.none()
    | st.text(max_size=30)
    | st.lists(
        st.sampled_from(["name", "-rank", "score", "-version", "tags", "", "-", "+price"])
        | st.integers(),
        max_size=4,
    )
)
cursors = (
    st.none()
    | st.text(max_size=80)
    | st.binary(max_size=64).map(
        lambda raw: (
            base64.urlsafe_b64encode(raw).decode()
            + "."
            + base64.urlsafe_b64encode(raw[::-1]).decode()
        )
    )
)


async def snapshot(factory: Any) -> list[tuple[Any, ...]]:
    with system_context():
        async with factory.session_factory() as session:
            rows = await session.execute(select(models.items).order_by(models.items.c.sku))
            tags = await session.execute(select(models.item_tags).order_by(models.item_tags.c.id))
            return [tuple(r) for r in rows.all()] + [tuple(r) for r in tags.all()]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    filters=st.dictionaries(keys, values, max_size=4) | values,
    sort=sorts,
    cursor=cursors,
    size=st.integers(-3, 2000) | st.text(max_size=3),
    page_number=st.none() | st.integers(-2, 5),
)
def test_garbage_raises_only_qx_errors_and_changes_nothing(
    database: Database, filters: Any, sort: Any, cursor: Any, size: Any, page_number: Any
) -> None:
    async def body(factory: Any) -> None:
        before = await snapshot(factory)
        with request_context(tenant_id=TENANT):
            async with factory() as uow:
                for call in (
                    lambda: uow.items.list(filters=filters, sort=sort),
                    lambda: uow.items.count(filters=filters),
                    lambda: uow.items.page(
                        filters=filters, sort=sort, cursor=cursor, page_size=size
                    ),
                    lambda: uow.items.page(sort=sort, page_number=page_number, page_size=size),
                ):
                    with contextlib.suppress(QxError):
                        await call()
        assert await snapshot(factory) == before

    database.run(body)
