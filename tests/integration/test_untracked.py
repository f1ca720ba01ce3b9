"""``QuerySet.untracked()``: the rows a tracked query would return, as values nothing tracks.

A small shop domain of its own - an aggregate with a value object in a decorated column, an
unmapped field set by ``__post_init__``, owned parts in a list (soft-deletable, each with
parts of its own) and in a dict keyed by a column, a many-to-one reference to another
entity and a many-to-many one - on memory, SQLite and PostgreSQL. Generated data and queries:
every untracked read equals the tracked read of the same query, field by field, part by
part. Then what an untracked row is: a value (changing it, adding it or reading what was
not read with it is a ``UnitOfWorkError`` naming it; nothing is ever written for it), read
under the tenant's scoping, one object per row within one read, one SELECT per level.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, ForeignKey, Numeric, String, Table, Uuid, update
from sqlalchemy.orm import attribute_keyed_dict, relationship

from qx.core import AggregateRoot, new_id, request_context, utcnow
from qx.db import (
    Repository,
    UnitOfWork,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    soft_delete_column,
    tenant_column,
    uuid_pk,
    version_column,
)
from qx.db.query import Q
from qx.errors import InvalidQuery, TenantRequired, UnitOfWorkError
from tests.integration.conftest import own_domain
from tests.integration.test_model_shapes import EmailAddress, EmailType
from tests.integration.test_query import statements

shop_metadata = make_metadata()
shop_registry = make_registry(shop_metadata)


@dataclass(eq=False, kw_only=True)
class Supplier:
    id: UUID = field(default_factory=new_id)
    name: str
    tenant_id: str | None = None


@dataclass(eq=False, kw_only=True)
class Label:
    id: UUID = field(default_factory=new_id)
    text: str


@dataclass(eq=False, kw_only=True)
class Price:
    id: UUID = field(default_factory=new_id)
    currency: str
    amount: Decimal
    tenant_id: str | None = None


@dataclass(eq=False, kw_only=True)
class Product:
    id: UUID = field(default_factory=new_id)
    sku: str
    prices: list[Price] = field(default_factory=list)
    tenant_id: str | None = None
    deleted_at: Any = None


@dataclass(eq=False, kw_only=True)
class Opening:
    id: UUID = field(default_factory=new_id)
    day: str
    hours: str
    tenant_id: str | None = None


@dataclass(eq=False, kw_only=True)
class Shop(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    email: EmailAddress
    supplier_id: UUID | None = None
    supplier: Supplier | None = None
    partner_id: UUID | None = None
    partner: Supplier | None = None
    labels: list[Label] = field(default_factory=list)
    products: list[Product] = field(default_factory=list)
    openings: dict[str, Opening] = field(default_factory=dict)
    signature: str = field(init=False, default="")  # not mapped: __post_init__ makes it
    version: int = 1
    tenant_id: str | None = None
    deleted_at: Any = None

    def __post_init__(self) -> None:
        self.signature = f"{self.name} <{self.email.value}>"


suppliers = Table(
    "ut_suppliers", shop_metadata, uuid_pk(), Column("name", String(40)), tenant_column()
)
labels = Table("ut_labels", shop_metadata, uuid_pk(), Column("text", String(40)))
shops = Table(
    "ut_shops",
    shop_metadata,
    uuid_pk(),
    Column("name", String(40), nullable=False),
    Column("email", EmailType(), nullable=False),
    Column("supplier_id", Uuid(), ForeignKey("ut_suppliers.id"), nullable=True),
    Column("partner_id", Uuid(), ForeignKey("ut_suppliers.id"), nullable=True),
    version_column(),
    tenant_column(),
    soft_delete_column(),
)
shop_labels = Table(
    "ut_shop_labels",
    shop_metadata,
    Column("shop_id", Uuid(), ForeignKey("ut_shops.id"), primary_key=True),
    Column("label_id", Uuid(), ForeignKey("ut_labels.id"), primary_key=True),
)
products = Table(
    "ut_products",
    shop_metadata,
    uuid_pk(),
    Column("shop_id", Uuid(), ForeignKey("ut_shops.id"), nullable=False, index=True),
    Column("sku", String(20), nullable=False),
    tenant_column(),
    soft_delete_column(),
)
prices = Table(
    "ut_prices",
    shop_metadata,
    uuid_pk(),
    Column("product_id", Uuid(), ForeignKey("ut_products.id"), nullable=False, index=True),
    Column("currency", String(3), nullable=False),
    Column("amount", Numeric(10, 2), nullable=False),
    tenant_column(),
)
openings = Table(
    "ut_openings",
    shop_metadata,
    uuid_pk(),
    Column("shop_id", Uuid(), ForeignKey("ut_shops.id"), nullable=False, index=True),
    Column("day", String(3), nullable=False),
    Column("hours", String(20), nullable=False),
    tenant_column(),
)
map_entity(shop_registry, Supplier, suppliers)
map_entity(shop_registry, Label, labels)
map_entity(shop_registry, Price, prices)
map_entity(
    shop_registry,
    Product,
    products,
    properties={
        "prices": relationship(Price, cascade="all, delete-orphan", order_by=prices.c.currency)
    },
)
map_entity(shop_registry, Opening, openings)
map_aggregate(
    shop_registry,
    Shop,
    shops,
    post_init="run",
    properties={
        "supplier": relationship(Supplier, foreign_keys=[shops.c.supplier_id]),
        # Not part of the shop, but loaded with every one: untracked reads it too.
        "partner": relationship(Supplier, foreign_keys=[shops.c.partner_id], lazy="selectin"),
        "labels": relationship(Label, secondary=shop_labels),
        "products": relationship(Product, cascade="all, delete-orphan", order_by=products.c.sku),
        "openings": relationship(
            Opening, cascade="all, delete-orphan", collection_class=attribute_keyed_dict("day")
        ),
    },
)


class Shops(Repository[Shop]):
    filterable = frozenset({"name", "products__sku", "supplier__name"})
    sortable = frozenset({"name"})
    default_order = ("name",)


class Suppliers(Repository[Supplier]):
    pass


class ShopUnitOfWork(UnitOfWork):
    shops: Shops
    suppliers: Suppliers


@pytest.fixture
async def shop(backend: str, tmp_path: Any) -> AsyncIterator[tuple[Any, Any]]:
    async with own_domain(
        backend, tmp_path, ShopUnitOfWork, shop_metadata, cursor_secret="untracked-tests-secret"
    ) as found:
        yield found


def snapshot(obj: Any, loaded: tuple[str, ...] = ()) -> Any:
    """Every mapped field of ``obj`` and of its parts (and of what ``loaded`` names), by value."""
    if obj is None:
        return None
    if isinstance(obj, Shop):
        return {
            "id": obj.id, "name": obj.name, "email": obj.email, "supplier_id": obj.supplier_id,
            "signature": obj.signature, "version": obj.version, "tenant_id": obj.tenant_id,
            "deleted_at": obj.deleted_at,
            "products": [snapshot(p) for p in obj.products],
            "openings": sorted((day, snapshot(o)) for day, o in obj.openings.items()),
            "supplier": snapshot(obj.supplier) if "supplier" in loaded else "not read",
            "partner": snapshot(obj.partner),
        }  # fmt: skip
    if isinstance(obj, Product):
        return (obj.id, obj.sku, obj.tenant_id, obj.deleted_at, [snapshot(p) for p in obj.prices])
    if isinstance(obj, Price):
        return (obj.id, obj.currency, obj.amount, obj.tenant_id)
    if isinstance(obj, Opening):
        return (obj.id, obj.day, obj.hours, obj.tenant_id)
    assert isinstance(obj, Supplier)
    return (obj.id, obj.name, obj.tenant_id)


async def seed(factory: Any, rng: random.Random) -> list[Shop]:
    """Shops of two tenants; soft-deleted shops and products; a supplier shared by shops."""
    made: list[Shop] = []
    for tenant in ("t1", "t2"):
        with request_context(tenant_id=tenant):
            async with factory() as uow:
                common = [Supplier(name=f"{tenant}-s{i}") for i in range(3)]
                await uow.suppliers.add_many(common)
                for n in range(rng.randint(6, 12)):
                    name = rng.choice("abc") + rng.choice("xyz") + str(n)
                    shop = Shop(name=name, email=EmailAddress(f"{name}@{tenant}.example"))
                    shop.supplier = rng.choice([None, *common])
                    shop.partner = rng.choice([None, *common])
                    for k in range(rng.randint(0, 4)):
                        product = Product(sku=f"{rng.choice('PQ')}{k}")
                        for currency in rng.sample(["EUR", "USD", "CHF"], rng.randint(0, 3)):
                            product.prices.append(
                                Price(currency=currency, amount=Decimal(rng.randint(1, 999)) / 100)
                            )
                        shop.products.append(product)
                    for day in rng.sample(["mon", "tue", "wed"], rng.randint(0, 3)):
                        shop.openings[day] = Opening(day=day, hours=f"{rng.randint(6, 10)}-18")
                    made.append(shop)
                    await uow.shops.add(shop)
                await uow.commit()
            async with factory() as uow:  # soft deletes: some shops, some products
                for shop in made[-4:]:
                    if rng.random() < 0.5:
                        await uow.shops.remove(await uow.shops.require(shop.id))
                    elif shop.products:
                        gone = update(products).where(products.c.id == shop.products[0].id)
                        await uow.session.execute(gone.values(deleted_at=utcnow()))
                await uow.commit()
    return made


def queries(rng: random.Random, count: int) -> list[tuple[str, Any]]:
    """(description, build(query) -> query) pairs over the shops' filters and sorts."""
    out: list[tuple[str, Any]] = []
    for _ in range(count):
        steps: list[tuple[str, Any]] = []
        if rng.random() < 0.6:
            letter = rng.choice("abc")
            steps.append((f"name^{letter}", lambda q, v=letter: q.filter(name__startswith=v)))
        if rng.random() < 0.3:
            sku = rng.choice(["P0", "Q1", "P2"])
            steps.append((f"sku={sku}", lambda q, v=sku: q.filter(Q(products__sku=v))))
        if rng.random() < 0.2:
            steps.append(("supplier~s1", lambda q: q.filter(supplier__name__endswith="s1")))
        order = rng.choice(["name", "-name"])
        steps.append((order, lambda q, v=order: q.order_by(v)))
        if rng.random() < 0.5:
            limit = rng.randint(1, 8)
            steps.append((f"limit {limit}", lambda q, v=limit: q.limit(v)))
            if rng.random() < 0.5:
                offset = rng.randint(0, 4)
                steps.append((f"offset {offset}", lambda q, v=offset: q.offset(v)))
        if rng.random() < 0.3:
            steps.append(("with deleted", lambda q: q.with_deleted()))
        if rng.random() < 0.4:
            steps.append(("load supplier", lambda q: q.load("supplier")))

        def build(q: Any, steps: list[tuple[str, Any]] = steps) -> Any:
            for _, step in steps:
                q = step(q)
            return q

        out.append((" ".join(name for name, _ in steps), build))
    return out


@pytest.mark.parametrize("seed_value", [1, 2, 3])
async def test_an_untracked_read_equals_the_tracked_read_of_the_same_query(
    shop: tuple[Any, Any], seed_value: int
) -> None:
    factory, _ = shop
    rng = random.Random(seed_value)
    await seed(factory, rng)
    with request_context(tenant_id="t1"):
        for described, build in queries(rng, 25):
            loads = ("supplier",) if "load supplier" in described else ()
            async with factory() as uow:
                tracked = await build(uow.shops.query()).all()
                want = [snapshot(s, loads) for s in tracked]
            async with factory() as uow:
                untracked = await build(uow.shops.query()).untracked().all()
                assert [snapshot(s, loads) for s in untracked] == want, described
                first = await build(uow.shops.query()).untracked().first()
                assert snapshot(first, loads) == (want[0] if want else None), described
            # Nothing of the other tenant, at any depth.
            for found in untracked:
                assert found.tenant_id == "t1"
                assert all(p.tenant_id == "t1" for p in found.products)
                assert all(o.tenant_id == "t1" for o in found.openings.values())
        async with factory() as uow:
            tracked_page = await uow.shops.query().order_by("name").page(page_size=3)
            page = await uow.shops.query().order_by("name").untracked().page(page_size=3)
            assert [snapshot(s) for s in page.items] == [snapshot(s) for s in tracked_page.items]
            assert page.next_cursor == tracked_page.next_cursor
            keys = [s.id for s in tracked_page.items]
            by_key = await uow.shops.query().untracked().by_keys(keys)
            assert {k: snapshot(v) for k, v in by_key.items()} == {
                s.id: snapshot(s) for s in tracked_page.items
            }


async def test_an_untracked_row_is_a_value_nothing_saves(shop: tuple[Any, Any]) -> None:
    factory, engine = shop
    await seed(factory, random.Random(7))
    with request_context(tenant_id="t1"):
        async with factory() as uow:
            with statements(engine) as seen:
                found = await uow.shops.query().order_by("name").untracked().all()
                value = found[0]
                with pytest.raises(UnitOfWorkError, match=r"this Shop was read with untracked\(\)"):
                    value.name = "changed"
                with pytest.raises(UnitOfWorkError, match=r"untracked\(\)"):
                    _ = value.supplier  # not read with it: load("supplier") would have
                with pytest.raises(UnitOfWorkError, match=r"untracked\(\)"):
                    await uow.shops.add(value)
                product = next(s.products[0] for s in found if s.products)
                with pytest.raises(UnitOfWorkError, match=r"this Product was read"):
                    product.sku = "changed"
                # The same row read tracked is another object.
                tracked = await uow.shops.require(value.id)
                assert tracked is not value and snapshot(tracked) == snapshot(value)
                await uow.commit()
            assert not any(s.lstrip().upper().startswith(("INSERT", "UPDATE")) for s in seen)
        async with factory() as uow:
            tracked = await uow.shops.require(value.id)
            tracked.name = "renamed"
            await uow.commit()
        async with factory() as uow:
            assert (await uow.shops.require(value.id)).name == "renamed"
            # A value read before keeps what it read.
            assert value.name != "renamed"


async def test_one_object_per_row_within_one_read_and_one_select_per_level(
    shop: tuple[Any, Any], backend: str
) -> None:
    factory, engine = shop
    await seed(factory, random.Random(11))
    with request_context(tenant_id="t1"):
        async with factory() as uow:
            with statements(engine) as seen:
                found = await uow.shops.query().load("supplier").untracked().all()
            # shops; their partner, products, openings and supplier; the products' prices.
            selects = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
            assert len(selects) == 6, selects
            if backend == "postgresql":
                assert not any(s.strip().upper().startswith("BEGIN") for s in seen), seen
            by_supplier: dict[UUID, Any] = {}
            for one in found:
                if one.supplier is not None:
                    assert by_supplier.setdefault(one.supplier.id, one.supplier) is one.supplier
            assert len(by_supplier) < sum(1 for one in found if one.supplier is not None)


async def test_untracked_refuses_what_it_cannot_do_by_name(shop: tuple[Any, Any]) -> None:
    factory, _ = shop
    await seed(factory, random.Random(5))
    with request_context(tenant_id="t1"):
        async with factory() as uow:
            query = uow.shops.query()
            with pytest.raises(InvalidQuery, match="cannot be locked") as caught:
                query.for_update().untracked()
            assert caught.value.field == "untracked"
            with pytest.raises(InvalidQuery, match="cannot be locked"):
                query.untracked().for_update()
            with pytest.raises(InvalidQuery, match="read whole"):
                async for _ in query.untracked().stream():
                    pass
            with pytest.raises(InvalidQuery, match="association table") as caught:
                await query.load("labels").untracked().all()
            assert caught.value.field == "labels"
            assert len(str(caught.value)) < 300
    async with factory() as uow:
        with pytest.raises(TenantRequired):
            await uow.shops.query().untracked().all()


async def test_an_untracked_read_sees_what_the_unit_of_work_has_not_written_yet(
    shop: tuple[Any, Any],
) -> None:
    # As the tracked query does: pending new aggregates and pending changes are written
    # before the read, so both reads find the same rows with the same values.
    factory, _ = shop
    with request_context(tenant_id="t1"):
        async with factory() as uow:
            kept = Shop(name="kept", email=EmailAddress("k@t1.example"))
            await uow.shops.add(kept)
            await uow.commit()
        async with factory() as uow:
            await uow.shops.add(Shop(name="pending", email=EmailAddress("p@t1.example")))
            (await uow.shops.require(kept.id)).name = "renamed"
            for name in ("pending", "renamed"):
                tracked = await uow.shops.query().filter(name=name).all()
                untracked = await uow.shops.query().filter(name=name).untracked().all()
                # (Not the signature: __post_init__ made the tracked one's at its load,
                # before the rename; the untracked row is built from the stored values.)
                stored = [{**snapshot(s), "signature": None} for s in tracked]
                assert [{**snapshot(s), "signature": None} for s in untracked] == stored
                assert len(untracked) == 1
                assert untracked[0].signature == f"{name} <{untracked[0].email.value}>"
