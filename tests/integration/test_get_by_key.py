"""``Repository.get`` by primary key, as an application calls it, on every backend.

``get`` loads through one statement per repository class, built once (``session.get`` built
one and computed its cache key on every call). What ``session.get`` did around that load is
qx's to keep: the identity map first (no SQL), an expired object refreshed and a vanished one
``None``, composite keys in the mapper's column order, keys converted and checked like filter
values. A small domain of its own: stock counted per (warehouse, sku), and tickets with a
64-bit integer key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, Integer, String, Table, delete, update
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import AggregateRoot
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    make_metadata,
    make_registry,
    map_aggregate,
    version_column,
)
from qx.errors import InvalidQuery
from tests.integration.conftest import own_domain
from tests.integration.test_query import statements

keys_metadata = make_metadata()
registry = make_registry(keys_metadata)


@dataclass(eq=False, kw_only=True)
class Stock(AggregateRoot):
    warehouse: str
    sku: str
    quantity: int
    version: int = 1


@dataclass(eq=False, kw_only=True)
class Ticket(AggregateRoot):
    id: int | None = None
    title: str
    version: int = 1


stocks = Table(
    "key_stocks",
    keys_metadata,
    Column("warehouse", String(10), primary_key=True),
    Column("sku", String(10), primary_key=True),
    Column("quantity", Integer(), nullable=False),
    version_column(),
)
tickets = Table(
    "key_tickets",
    keys_metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("title", String(50), nullable=False),
    version_column(),
)
map_aggregate(registry, Stock, stocks)
map_aggregate(registry, Ticket, tickets)


class Stocks(Repository[Stock]):
    pass


class Tickets(Repository[Ticket]):
    pass


class KeysUnitOfWork(UnitOfWork):
    stocks: Stocks
    tickets: Tickets


Keyed = tuple[UnitOfWorkFactory[KeysUnitOfWork], AsyncEngine]


@pytest.fixture
async def keyed(backend: str, tmp_path: Any) -> AsyncIterator[Keyed]:
    async with own_domain(backend, tmp_path, KeysUnitOfWork, keys_metadata) as made:
        yield made


async def _stock(keyed: Keyed) -> None:
    factory, _ = keyed
    async with factory() as uow:
        await uow.stocks.add_many(
            [
                Stock(warehouse="w1", sku="a", quantity=1),
                Stock(warehouse="w1", sku="b", quantity=2),
                Stock(warehouse="w2", sku="a", quantity=3),
            ]
        )
        await uow.commit()


async def test_a_composite_key_finds_its_row_once_per_unit_of_work(keyed: Keyed) -> None:
    await _stock(keyed)
    factory, engine = keyed
    async with factory() as uow:
        with statements(engine) as seen:
            found = await uow.stocks.require(("w1", "b"))
            assert (found.warehouse, found.sku, found.quantity) == ("w1", "b", 2)
            selects = [s for s in seen if s.startswith("SELECT")]
            assert len(selects) == 1
            # The identity map answers the second time: the same object, no statement.
            assert await uow.stocks.get(("w1", "b")) is found
            assert [s for s in seen if s.startswith("SELECT")] == selects
        other = await uow.stocks.require(("w2", "a"))
        assert other.quantity == 3
        assert await uow.stocks.get(("b", "w1")) is None  # the columns' order matters
        assert await uow.stocks.get(("w9", "a")) is None


@pytest.mark.parametrize(
    ("ident", "says"),
    [
        ("w1", "2-column primary key"),
        (("w1", "a", "x"), "2-column primary key"),
        (("w1", None), "cannot be None"),
        (("w1", 7), "sku"),
    ],
)
async def test_a_wrong_composite_key_is_refused_by_name(
    keyed: Keyed, ident: Any, says: str
) -> None:
    await _stock(keyed)
    factory, _ = keyed
    async with factory() as uow:
        with pytest.raises(InvalidQuery, match=says) as raised:
            await uow.stocks.get(ident)
        assert len(str(raised.value)) < 300


async def test_an_integer_key_is_converted_and_range_checked(keyed: Keyed) -> None:
    factory, _ = keyed
    async with factory() as uow:
        ticket = Ticket(title="first")
        await uow.tickets.add(ticket)
        await uow.commit()
    assert ticket.id is not None
    async with factory() as uow:
        assert (await uow.tickets.require(str(ticket.id))).title == "first"  # an HTTP path id
        assert await uow.tickets.get(ticket.id + 1000) is None
        for bad in (2**63, True, "1.5", 1.5):
            with pytest.raises(InvalidQuery) as raised:
                await uow.tickets.get(bad)
            assert raised.value.field == "id", bad
        with pytest.raises(InvalidQuery, match="cannot be None"):
            await uow.tickets.get(None)


async def test_an_expired_object_is_read_again_and_a_vanished_one_is_none(keyed: Keyed) -> None:
    factory, _ = keyed
    async with factory() as uow:
        kept, gone = Ticket(title="kept"), Ticket(title="gone")
        await uow.tickets.add_many([kept, gone])
        await uow.commit()
    async with factory() as uow:
        loaded = await uow.tickets.require(kept.id)
        doomed = await uow.tickets.require(gone.id)
        # Changed and deleted behind the objects' backs, in the same transaction (so every
        # backend sees it), and the objects expired: get() must not answer from stale state.
        await uow.session.execute(
            update(tickets).where(tickets.c.id == kept.id).values(title="new")
        )
        await uow.session.execute(delete(tickets).where(tickets.c.id == gone.id))
        uow.session.expire(loaded)
        uow.session.expire(doomed)
        again = await uow.tickets.require(kept.id)
        assert again is loaded and again.title == "new"
        assert await uow.tickets.get(gone.id) is None
        assert await uow.tickets.get(gone.id) is None  # and stays gone
