"""Test-only aggregates, mapped beside the orders example."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from sqlalchemy import CheckConstraint, Column, ForeignKey, Integer, String, Table, Uuid

from qx.core import AggregateRoot, DomainEvent, IntegrationEvent, new_id
from qx.db import (
    Repository,
    UnitOfWork,
    audit_columns,
    make_metadata,
    make_registry,
    map_aggregate,
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


class AppUnitOfWork(UnitOfWork):
    orders: OrderRepository
    counters: CounterRepository
    attachments: AttachmentRepository
