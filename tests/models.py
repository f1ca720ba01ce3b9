"""Test-only aggregates, mapped beside the orders example."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Table,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import relationship

from qx.core import AggregateRoot, DomainEvent, IntegrationEvent, new_id
from qx.db import (
    Repository,
    UnitOfWork,
    audit_columns,
    make_metadata,
    make_registry,
    map_aggregate,
    map_entity,
    soft_delete_column,
    tenant_column,
    uuid_pk,
    version_column,
)
from qx.examples.orders.infrastructure import OrderRepository

metadata = make_metadata()
registry = make_registry(metadata)


@dataclass(frozen=True, kw_only=True)
class Incremented(DomainEvent):
    counter_id: UUID
    value: int


@dataclass(frozen=True, kw_only=True)
class CounterChangedV1(IntegrationEvent):
    name = "tests.counter_changed"
    version = 1
    counter_id: UUID
    value: int


@dataclass(eq=False, kw_only=True)
class Counter(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    value: int = 0
    version: int = 1
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def increment(self, *, integration: bool = False) -> None:
        self.value += 1
        self.record(Incremented(counter_id=self.id, value=self.value))
        if integration:
            self.record(CounterChangedV1(counter_id=self.id, value=self.value))


counters = Table(
    "counters",
    metadata,
    uuid_pk(),
    Column("name", String(50), nullable=False, unique=True),
    Column("value", Integer(), nullable=False),
    CheckConstraint("value >= 0", name="value_non_negative"),
    version_column(),
    *audit_columns(),
)
map_aggregate(registry, Counter, counters)


class CounterRepository(Repository[Counter]):
    filterable = frozenset({"name", "value"})
    sortable = frozenset({"name", "value"})


@dataclass(eq=False, kw_only=True)
class Attachment(AggregateRoot):
    """Points at a counter through a DEFERRED foreign key: violations surface at COMMIT."""

    id: UUID = field(default_factory=new_id)
    counter_id: UUID
    version: int = 1


attachments = Table(
    "attachments",
    metadata,
    uuid_pk(),
    Column(
        "counter_id",
        Uuid(),
        ForeignKey("counters.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
    version_column(),
)
map_aggregate(registry, Attachment, attachments)


class AttachmentRepository(Repository[Attachment]):
    pass


# -- a catalog for the query API: nullable sort keys, every kind of relationship -------------


@dataclass(eq=False, kw_only=True)
class Category:
    """Many-to-one target of Item; tenant-scoped, with a globally unique code."""

    id: UUID = field(default_factory=new_id)
    code: str
    name: str
    tenant_id: str | None = None


@dataclass(eq=False, kw_only=True)
class Group:
    """Many-to-many partner of Item."""

    id: UUID = field(default_factory=new_id)
    name: str
    tenant_id: str | None = None


@dataclass(eq=False, kw_only=True)
class Tag:
    """Owned part of Item (one-to-many, delete-orphan)."""

    id: UUID = field(default_factory=new_id)
    label: str
    weight: int | None = None
    tenant_id: str | None = None


@dataclass(eq=False, kw_only=True)
class Item(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    sku: str
    rank: int = 0
    score: int | None = None
    price: Decimal | None = None
    category_id: UUID | None = None
    category: Category | None = None
    tags: list[Tag] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    version: int = 1
    tenant_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deleted_at: datetime | None = None


categories = Table(
    "categories",
    metadata,
    uuid_pk(),
    Column("code", String(40), nullable=False, unique=True),
    Column("name", String(100), nullable=False),
    tenant_column(),
)
groups = Table(
    "groups", metadata, uuid_pk(), Column("name", String(100), nullable=False), tenant_column()
)
items = Table(
    "items",
    metadata,
    uuid_pk(),
    Column("name", String(100), nullable=False),
    Column("sku", String(40), nullable=False),
    Column("rank", Integer(), nullable=False),
    Column("score", Integer(), nullable=True),
    Column("price", Numeric(12, 2), nullable=True),
    Column("category_id", Uuid(), ForeignKey("categories.id"), nullable=True, index=True),
    version_column(),
    tenant_column(),
    *audit_columns(),
    soft_delete_column(),
    UniqueConstraint("tenant_id", "sku"),
)
item_tags = Table(
    "item_tags",
    metadata,
    uuid_pk(),
    # No ON DELETE CASCADE: bulk deletes must remove owned parts themselves.
    Column("item_id", Uuid(), ForeignKey("items.id"), nullable=False, index=True),
    Column("label", String(40), nullable=False),
    Column("weight", Integer(), nullable=True),
    tenant_column(),
)
item_groups = Table(
    "item_groups",
    metadata,
    Column("item_id", Uuid(), ForeignKey("items.id"), primary_key=True),
    Column("group_id", Uuid(), ForeignKey("groups.id"), primary_key=True),
)
map_entity(registry, Category, categories)
map_entity(registry, Group, groups)
map_entity(registry, Tag, item_tags)
map_aggregate(
    registry,
    Item,
    items,
    properties={
        "category": relationship(Category),
        "tags": relationship(Tag, cascade="all, delete-orphan", order_by=item_tags.c.label),
        "groups": relationship(Group, secondary=item_groups),
    },
)


class ItemRepository(Repository[Item]):
    filterable = frozenset(
        {
            "name",
            "sku",
            "rank",
            "score",
            "price",
            "created_at",
            "category_id",
            "category__name",
            "category__code",
            "tags__label",
            "tags__weight",
            "groups__name",
        }
    )
    sortable = frozenset({"name", "sku", "rank", "score", "price", "created_at"})
    default_order = ("name",)


class CategoryRepository(Repository[Category]):
    filterable = frozenset({"code", "name"})
    sortable = frozenset({"code", "name"})


# -- two shapes for Repository.get: parts that are soft-deleted themselves (loaded selectin,
#    so get() reads the root by primary key and scopes the parts' load), and parts loaded
#    with a JOIN (get() keeps loader criteria on the one statement) ---------------------------


@dataclass(eq=False, kw_only=True)
class Note:
    id: UUID = field(default_factory=new_id)
    text: str
    tenant_id: str | None = None
    deleted_at: datetime | None = None


@dataclass(eq=False, kw_only=True)
class Folder(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    notes: list[Note] = field(default_factory=list)
    version: int = 1
    tenant_id: str | None = None
    deleted_at: datetime | None = None


folders = Table(
    "folders",
    metadata,
    uuid_pk(),
    Column("name", String(50), nullable=False),
    version_column(),
    tenant_column(),
    soft_delete_column(),
)
notes = Table(
    "notes",
    metadata,
    uuid_pk(),
    Column("folder_id", Uuid(), ForeignKey("folders.id"), nullable=False, index=True),
    Column("text", String(50), nullable=False),
    tenant_column(),
    soft_delete_column(),
)
map_entity(registry, Note, notes)
map_aggregate(
    registry,
    Folder,
    folders,
    properties={"notes": relationship(Note, cascade="all, delete-orphan", order_by=notes.c.text)},
)


@dataclass(eq=False, kw_only=True)
class Book:
    id: UUID = field(default_factory=new_id)
    title: str
    tenant_id: str | None = None


@dataclass(eq=False, kw_only=True)
class Shelf(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    name: str
    books: list[Book] = field(default_factory=list)
    version: int = 1
    tenant_id: str | None = None


shelves = Table(
    "shelves",
    metadata,
    uuid_pk(),
    Column("name", String(50), nullable=False),
    version_column(),
    tenant_column(),
)
books = Table(
    "books",
    metadata,
    uuid_pk(),
    Column("shelf_id", Uuid(), ForeignKey("shelves.id"), nullable=False, index=True),
    Column("title", String(50), nullable=False),
    tenant_column(),
)
map_entity(registry, Book, books)
map_aggregate(
    registry,
    Shelf,
    shelves,
    properties={
        "books": relationship(
            Book, cascade="all, delete-orphan", lazy="joined", order_by=books.c.title
        )
    },
)


class FolderRepository(Repository[Folder]):
    pass


class ShelfRepository(Repository[Shelf]):
    pass


class AppUnitOfWork(UnitOfWork):
    orders: OrderRepository
    counters: CounterRepository
    attachments: AttachmentRepository
    items: ItemRepository
    categories: CategoryRepository
    folders: FolderRepository
    shelves: ShelfRepository
