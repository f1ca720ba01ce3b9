"""Repository reads: filters, sorting, windows, and InvalidQuery for anything not allowed."""

from __future__ import annotations

import pytest

from qx.core import request_context
from qx.db import UnitOfWorkFactory
from qx.errors import InvalidQuery, NotFound
from tests.integration.helpers import new_order
from tests.models import AppUnitOfWork, Counter

Factory = UnitOfWorkFactory[AppUnitOfWork]


async def _counters(uow_factory: Factory) -> list[Counter]:
    async with uow_factory() as uow:
        made = [Counter(name=n, value=v) for n, v in [("b", 2), ("a", 1), ("c", 2), ("d", 0)]]
        await uow.counters.add_many(made)
        await uow.commit()
    return made


async def test_list_filters_sorts_and_windows(uow_factory: Factory) -> None:
    await _counters(uow_factory)
    async with uow_factory() as uow:
        assert [c.name for c in await uow.counters.list(order_by="name")] == ["a", "b", "c", "d"]
        assert [c.name for c in await uow.counters.list(order_by="-name")] == ["d", "c", "b", "a"]
        by_value = await uow.counters.list(order_by=["-value", "name"])
        assert [c.name for c in by_value] == ["b", "c", "a", "d"]
        assert [c.name for c in await uow.counters.list(value=2, order_by="name")] == ["b", "c"]
        assert [c.name for c in await uow.counters.list(value="2", order_by="name")] == ["b", "c"]
        page = await uow.counters.list(order_by="name", limit=2, offset=1)
        assert [c.name for c in page] == ["b", "c"]
        assert await uow.counters.count(value=2) == 2
        assert await uow.counters.exists(name="a")
        assert not await uow.counters.exists(name="zzz")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"secret": 1}, "secret"),  # not a column, not allowed
        ({"version": 1}, "version"),  # a column, but not in filterable
        ({"value": "many"}, "value"),  # wrong type
        ({"value": True}, "value"),  # bool is not an int here
        ({"order_by": "version"}, "version"),  # not sortable
        ({"order_by": "-nope"}, "nope"),
        ({"order_by": ""}, "sort"),
        ({"sort": ["name", 3]}, "sort"),
        ({"limit": -1}, "limit"),
        ({"limit": 10_000}, "limit"),
        ({"offset": "3"}, "offset"),
    ],
)
async def test_bad_filters_and_sorts_raise_invalid_query_naming_the_field(
    uow_factory: Factory, kwargs: dict[str, object], field: str
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(InvalidQuery) as info:
            await uow.counters.list(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert repr(field) in str(info.value) or field in str(info.value)


async def test_get_validates_ids_and_require_names_entity(uow_factory: Factory) -> None:
    async with uow_factory() as uow:
        with pytest.raises(InvalidQuery, match="expected a UUID"):
            await uow.counters.get("not-a-uuid")
        missing = Counter(name="x").id
        assert await uow.counters.get(str(missing)) is None
        with pytest.raises(NotFound, match=f"Counter '{missing}' not found") as info:
            await uow.counters.require(missing)
        assert info.value.entity == "Counter" and info.value.key == missing


async def test_add_refuses_other_types_and_remove_refuses_foreign_objects(
    uow_factory: Factory,
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(InvalidQuery, match="stores Counter, got Order"):
            await uow.counters.add(new_order())  # type: ignore[arg-type]
        with pytest.raises(InvalidQuery, match="not loaded through this unit of work"):
            await uow.counters.remove(Counter(name="never-added"))


async def test_orders_filter_on_timestamps(uow_factory: Factory) -> None:
    with request_context(tenant_id="t"):
        async with uow_factory() as uow:
            order = new_order()
            await uow.orders.add(order)
            await uow.commit()
        assert order.created_at is not None and order.created_at.tzinfo is not None
        async with uow_factory() as uow:
            found = await uow.orders.list(created_at=order.created_at.isoformat())
            assert [o.id for o in found] == [order.id]
            with pytest.raises(InvalidQuery, match="timezone"):
                await uow.orders.list(created_at="2030-01-01T00:00:00")
