"""Idempotency keys as a contract, through the bus, on every backend.

A small payments domain of its own: ``Pay`` creates a tenant-scoped ``Payment``. A key is
scoped to its caller (tenant, principal), bound to the request's fingerprint, answered with
409 while in flight, released when the command fails, and expires.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Column, Integer, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import AggregateRoot, new_id, request_context, utcnow
from qx.cqrs import Command, IdempotencyPolicy, MessageBus, purge_idempotency_keys
from qx.cqrs._idempotency import fingerprint
from qx.cqrs._table import idempotency_table
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    tenant_column,
    uuid_pk,
    version_column,
)
from qx.errors import IdempotencyKeyReused, RequestInFlight
from qx.testing import InMemoryStore


@dataclass(eq=False, kw_only=True)
class Payment(AggregateRoot):
    id: UUID = field(default_factory=new_id)
    amount: int
    version: int | None = None
    tenant_id: str | None = None


metadata = make_metadata()
payments = Table(
    "i_payments",
    metadata,
    uuid_pk(),
    Column("amount", Integer(), nullable=False),
    version_column(),
    tenant_column(),
)
map_aggregate(make_registry(metadata), Payment, payments)


class Payments(Repository[Payment]):
    pass


class PaymentsUnitOfWork(UnitOfWork):
    payments: Payments


@dataclass(frozen=True, kw_only=True)
class Pay(Command[UUID]):
    amount: int


class Gate:
    """Lets a test hold a handler in flight, waiting on conditions, never on sleeps."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.hold = False
        self.fail_next = False
        self.calls = 0


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def wired(engine: AsyncEngine, store: InMemoryStore | None, gate: Gate) -> Any:
    if store is not None:
        store.include(metadata)
    else:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    def make(policy: IdempotencyPolicy | None = None) -> MessageBus:
        bus = MessageBus(idempotency=policy)
        bus.provide(
            uow_factory=UnitOfWorkFactory(PaymentsUnitOfWork, create_session_factory(engine))
        )

        @bus.handler(Pay)
        async def pay(command: Pay, uow: PaymentsUnitOfWork) -> UUID:
            gate.calls += 1
            if gate.hold:
                gate.entered.set()
                await gate.release.wait()
            if gate.fail_next:
                gate.fail_next = False
                raise RuntimeError("the handler failed")
            payment = await uow.payments.add(Payment(amount=command.amount))
            return payment.id

        return bus

    return make


async def stored(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(payments)) or 0)


async def test_a_key_belongs_to_its_tenant_and_principal(wired: Any, engine: AsyncEngine) -> None:
    bus = wired()
    command = Pay(amount=5, idempotency_key="k-1")
    with request_context(tenant_id="acme"):
        acme = await bus.execute(command)
        assert await bus.execute(command) == acme  # a repeat: the first result
    with request_context(tenant_id="globex"):
        globex = await bus.execute(command)  # the same key, another caller: its own payment
    with request_context(tenant_id="acme", user_id="u2"):
        other_user = await bus.execute(command)
    assert len({acme, globex, other_user}) == 3
    assert await stored(engine) == 3


async def test_a_reused_key_with_another_request_is_refused(
    wired: Any, engine: AsyncEngine
) -> None:
    bus = wired()
    with request_context(tenant_id="acme"):
        await bus.execute(Pay(amount=5, idempotency_key="k-1"))
        with pytest.raises(IdempotencyKeyReused, match="different Pay"):
            await bus.execute(Pay(amount=6, idempotency_key="k-1"))
    assert await stored(engine) == 1


async def test_a_repeat_in_flight_is_told_so_then_gets_the_result(
    wired: Any, gate: Gate, engine: AsyncEngine
) -> None:
    bus = wired()
    command = Pay(amount=5, idempotency_key="k-1")
    gate.hold = True
    with request_context(tenant_id="acme"):
        first = asyncio.create_task(bus.execute(command))
        await gate.entered.wait()
        with pytest.raises(RequestInFlight):
            await bus.execute(command)
        gate.release.set()
        result = await first
        gate.hold = False
        assert await bus.execute(command) == result
    assert gate.calls == 1 and await stored(engine) == 1


async def test_a_failed_command_leaves_no_key_behind(
    wired: Any, gate: Gate, engine: AsyncEngine
) -> None:
    bus = wired()
    command = Pay(amount=5, idempotency_key="k-1")
    gate.fail_next = True
    with request_context(tenant_id="acme"):
        with pytest.raises(RuntimeError):
            await bus.execute(command)
        await bus.execute(command)
    assert gate.calls == 2 and await stored(engine) == 1


async def test_keys_expire_and_are_purged(wired: Any, gate: Gate, engine: AsyncEngine) -> None:
    bus = wired(IdempotencyPolicy(retention=0))
    command = Pay(amount=5, idempotency_key="k-1")
    with request_context(tenant_id="acme"):
        first = await bus.execute(command)
        second = await bus.execute(command)  # expired at once: runs again
    assert first != second and await stored(engine) == 2
    assert await purge_idempotency_keys(engine) == 1
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(idempotency_table)) == 0


async def test_an_abandoned_claim_is_taken_over(
    wired: Any, gate: Gate, engine: AsyncEngine
) -> None:
    bus = wired(IdempotencyPolicy(in_flight_timeout=30))
    command = Pay(amount=5, idempotency_key="k-1")
    gate.hold = True
    with request_context(tenant_id="acme"):
        first = asyncio.create_task(bus.execute(command))
        await gate.entered.wait()
        # The process running it dies: its claim stays "running" until the timeout.
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    async with engine.begin() as conn:
        await conn.execute(  # a claim from a process that vanished a minute ago
            idempotency_table.insert().values(
                tenant="acme",
                principal="",
                command="Pay",
                key="k-2",
                fingerprint=fingerprint(Pay(amount=7, idempotency_key="k-2")),
                state="running",
                created_at=utcnow() - timedelta(minutes=1),
                expires_at=utcnow() + timedelta(hours=1),
            )
        )
    gate.hold = False
    with request_context(tenant_id="acme"):
        await bus.execute(command)  # the cancelled first attempt released its key
        await bus.execute(Pay(amount=7, idempotency_key="k-2"))  # the abandoned one: taken over
    assert await stored(engine) == 2
