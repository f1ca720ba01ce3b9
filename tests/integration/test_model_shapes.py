"""Domain shapes a ported application used that qx's machinery got wrong (issue 23):

- owned parts in a dict-keyed collection (``attribute_keyed_dict``): the part walk iterated
  the dict's keys and the flush crashed;
- two new roots whose ``__eq__`` / ``__hash__`` use an id still ``None``: qx keyed roots by
  the user's equality, the two collapsed into one and the second's parts were refused;
- value objects where a ``TypeDecorator`` column takes them: ``exists(email=EmailAddress(..))``
  said "expected a string", ``get(UserID(..))`` on a decorated UUID key "expected a UUID".

Each on memory, SQLite and PostgreSQL, through the public API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, Table, TypeDecorator, Uuid
from sqlalchemy.orm import attribute_keyed_dict, relationship

from qx.core import AggregateRoot, new_id
from qx.db import (
    Repository,
    UnitOfWork,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    uuid_pk,
    version_column,
)
from qx.errors import InvalidQuery
from tests.integration.conftest import own_domain
from tests.integration.test_query import statements

shapes_metadata = make_metadata()
registry = make_registry(shapes_metadata)


@dataclass(eq=False, kw_only=True)
class Line:
    id: UUID = field(default_factory=new_id)
    sku: str
    quantity: int


@dataclass(eq=False, kw_only=True)
class Cart(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    owner: str
    lines: dict[str, Line] = field(default_factory=dict)
    version: int = 1

    def put(self, sku: str, quantity: int) -> None:
        if sku in self.lines:
            self.lines[sku].quantity = quantity
        else:
            self.lines[sku] = Line(sku=sku, quantity=quantity)

    def drop(self, sku: str) -> None:
        del self.lines[sku]


carts = Table(
    "shape_carts", shapes_metadata, uuid_pk(), Column("owner", String(50)), version_column()
)
cart_lines = Table(
    "shape_cart_lines",
    shapes_metadata,
    uuid_pk(),
    Column("cart_id", Uuid(), ForeignKey("shape_carts.id"), nullable=False, index=True),
    Column("sku", String(20), nullable=False),
    Column("quantity", Integer(), nullable=False),
)
map_entity(registry, Line, cart_lines)
map_aggregate(
    registry,
    Cart,
    carts,
    properties={
        "lines": relationship(
            Line, cascade="all, delete-orphan", collection_class=attribute_keyed_dict("sku")
        )
    },
)


@dataclass(kw_only=True)
class Step:
    id: int | None = None
    title: str

    def __eq__(self, other: object) -> bool:  # identity by database id, as many apps do
        return isinstance(other, Step) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(kw_only=True)
class Plan(AggregateRoot):
    id: int | None = None
    name: str
    steps: list[Step] = field(default_factory=list)
    version: int = 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


plans = Table(
    "shape_plans",
    shapes_metadata,
    Column("id", Integer(), primary_key=True, autoincrement=True),
    Column("name", String(50), nullable=False),
    version_column(),
)
steps = Table(
    "shape_steps",
    shapes_metadata,
    Column("id", Integer(), primary_key=True, autoincrement=True),
    Column("plan_id", Integer(), ForeignKey("shape_plans.id"), nullable=False, index=True),
    Column("title", String(50), nullable=False),
)
map_entity(registry, Step, steps)
map_aggregate(
    registry,
    Plan,
    plans,
    properties={"steps": relationship(Step, cascade="all, delete-orphan", order_by=steps.c.id)},
)


@dataclass(frozen=True)
class EmailAddress:
    value: str

    def __post_init__(self) -> None:
        if "@" not in self.value:
            raise ValueError(f"not an email address: {self.value!r}")


@dataclass(frozen=True)
class UserID:
    value: UUID


class EmailType(TypeDecorator[EmailAddress]):
    impl = String(100)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, EmailAddress):
            raise TypeError(f"expected an EmailAddress, got {type(value).__name__}")
        return value.value

    def process_result_value(self, value: Any, dialect: Any) -> EmailAddress | None:
        return None if value is None else EmailAddress(value)


class UserIDType(TypeDecorator[UserID]):
    impl = Uuid()
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> UUID | None:
        if value is None:
            return None
        return value.value if isinstance(value, UserID) else UUID(str(value))

    def process_result_value(self, value: Any, dialect: Any) -> UserID | None:
        return None if value is None else UserID(value if isinstance(value, UUID) else UUID(value))


@dataclass(eq=False, kw_only=True)
class Member(AggregateRoot):
    id: UserID = field(default_factory=lambda: UserID(new_id()))
    email: EmailAddress
    version: int = 1


members = Table(
    "shape_members",
    shapes_metadata,
    Column("id", UserIDType(), primary_key=True),
    Column("email", EmailType(), nullable=False, unique=True),
    version_column(),
)
map_aggregate(registry, Member, members)


class Members(Repository[Member]):
    filterable = frozenset({"email"})


class Carts(Repository[Cart]):
    pass


class Plans(Repository[Plan]):
    pass


class ShapesUnitOfWork(UnitOfWork):
    carts: Carts
    plans: Plans
    members: Members


@pytest.fixture
async def shapes(backend: str, tmp_path: Any) -> AsyncIterator[Any]:
    async with own_domain(backend, tmp_path, ShapesUnitOfWork, shapes_metadata) as (factory, _):
        yield factory


async def test_parts_in_a_dict_keyed_collection(shapes: Any) -> None:
    cart = Cart(owner="ada")
    cart.put("A", 1)
    cart.put("B", 2)
    async with shapes() as uow:
        await uow.carts.add(cart)
        await uow.commit()
    async with shapes() as uow:
        loaded = await uow.carts.require(cart.id)
        assert {sku: line.quantity for sku, line in loaded.lines.items()} == {"A": 1, "B": 2}
        loaded.put("A", 5)  # a part changed: the root's version moves
        loaded.drop("B")  # a part removed: deleted as an orphan
        loaded.put("C", 3)
        await uow.commit()
    async with shapes() as uow:
        again = await uow.carts.require(cart.id)
        assert {sku: line.quantity for sku, line in again.lines.items()} == {"A": 5, "C": 3}
        assert again.version == 2


async def test_new_roots_equal_by_a_missing_id_stay_two(shapes: Any) -> None:
    first = Plan(name="one", steps=[Step(title="a"), Step(title="b")])
    second = Plan(name="two", steps=[Step(title="c")])
    assert first == second  # both ids are None: the application's equality says "same"
    async with shapes() as uow:
        await uow.plans.add(first)
        await uow.plans.add(second)
        await uow.commit()
    assert first.id is not None and second.id is not None and first.id != second.id
    async with shapes() as uow:
        found = {p.name: [s.title for s in p.steps] for p in await uow.plans.list()}
    assert found == {"one": ["a", "b"], "two": ["c"]}


async def test_keys_the_database_generates_come_back_in_one_insert_per_table(
    shapes: Any, backend: str
) -> None:
    """New aggregates whose integer keys the database generates take the insert fast path:
    one INSERT per table (SQLite, which cannot promise RETURNING's order for many rows: one
    per row, as its flush does), each key read back to its own object and copied into its
    parts."""
    made = [Plan(name=f"p{n}", steps=[Step(title=f"s{n}.{k}") for k in range(3)]) for n in range(4)]
    async with shapes() as uow:
        for plan in made:
            await uow.plans.add(plan)
        with statements(uow.session.bind) as seen:
            await uow.commit()
    inserts = [s.split()[2] for s in seen if s.lstrip().upper().startswith("INSERT")]
    inserts = [table for table in inserts if table != "qx_commit"]  # an SQLite file's marker
    if backend == "postgresql":
        assert inserts == ["shape_plans", "shape_steps"]
        # qx's own INSERT (it names the transaction), not the flush's.
        assert "pg_current_xact_id()" in next(s for s in seen if "shape_plans" in s)
    else:
        assert inserts == ["shape_plans"] * 4 + ["shape_steps"] * 12
    assert not [s for s in seen if s.lstrip().upper().startswith(("UPDATE", "DELETE"))]
    assert len({plan.id for plan in made} - {None}) == 4
    for plan in made:
        assert all(step.plan_id == plan.id for step in plan.steps)  # type: ignore[attr-defined]
    async with shapes() as uow:
        stored = {
            p.id: (p.name, [(s.id, s.title) for s in p.steps]) for p in await uow.plans.list()
        }
    assert stored == {p.id: (p.name, [(s.id, s.title) for s in p.steps]) for p in made}


async def test_a_table_whose_rows_give_and_leave_their_key_goes_through_the_flush(
    shapes: Any,
) -> None:
    async with shapes() as uow:
        await uow.plans.add(Plan(id=1000, name="given"))
        await uow.plans.add(Plan(name="left"))
        await uow.commit()
    async with shapes() as uow:
        names = {p.id: p.name for p in await uow.plans.list()}
    assert names[1000] == "given" and sorted(names.values()) == ["given", "left"]


async def test_value_objects_where_a_decorated_column_takes_them(shapes: Any) -> None:
    ada = Member(email=EmailAddress("ada@example.org"))
    async with shapes() as uow:
        await uow.members.add(ada)
        await uow.commit()
    async with shapes() as uow:
        assert await uow.members.exists(email=EmailAddress("ada@example.org"))
        assert not await uow.members.exists(email=EmailAddress("bob@example.org"))
        found = await uow.members.get(ada.id)
        assert found is not None and found.email == EmailAddress("ada@example.org")
        assert (await uow.members.require(UserID(ada.id.value))).id == ada.id
        assert [m.id for m in await uow.members.list(email=EmailAddress("ada@example.org"))] == [
            ada.id
        ]
        # What the decorator refuses is a typed error naming the field.
        with pytest.raises(InvalidQuery, match="email"):
            await uow.members.exists(email=object())


async def test_rows_keyed_by_unordered_value_objects_are_written_together(shapes: Any) -> None:
    # UserID has no order: the rows are written in the order of their keys as text.
    made = [Member(email=EmailAddress(f"m{n}@example.org")) for n in range(3)]
    async with shapes() as uow:
        await uow.members.add_many(made)
        await uow.commit()
    async with shapes() as uow:
        for member in made:
            loaded = await uow.members.require(member.id)
            loaded.email = EmailAddress(f"new.{member.email.value}")
        await uow.commit()
    async with shapes() as uow:
        for member in made:
            again = await uow.members.require(member.id)
            assert (again.email, again.version) == (
                EmailAddress(f"new.{member.email.value}"),
                2,
            )
