"""qx.core: ids, context, events, aggregates, dispatch."""

from __future__ import annotations

import asyncio
import copy
import os
import time
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

import pytest

from qx.core import (
    AggregateRoot,
    DomainEvent,
    FixedClock,
    InProcessDispatcher,
    IntegrationEvent,
    current_context,
    new_id,
    request_context,
    system_context,
    uuid7_timestamp_ms,
)
from qx.errors import ConfigurationError


def test_new_id_is_uuid7_time_ordered_and_monotonic() -> None:
    ids = [new_id() for _ in range(20_000)]  # far more than one per millisecond
    assert all(i.version == 7 and i.variant == "specified in RFC 4122" for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert abs(uuid7_timestamp_ms(ids[-1]) - time.time() * 1000) < 5_000


def test_ids_made_after_a_fork_do_not_repeat_the_parents_random_bits() -> None:
    # Random bytes are read a page at a time: a child that kept its parent's page would
    # give its next ids the same random bits as the parent's next ids (and, within the
    # same millisecond and counter, the same ids).
    new_id()  # the parent holds a page now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            os.write(write, b"".join(new_id().bytes for _ in range(8)))
        finally:
            os._exit(0)
    os.close(write)
    mine = [new_id() for _ in range(8)]
    data = b""
    while chunk := os.read(read, 1024):
        data += chunk
    os.close(read)
    os.waitpid(child, 0)
    theirs = [UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)]
    assert len(theirs) == 8
    random_bits = 0x3FFF_FFFF_FFFF_FFFF
    assert not {i.int & random_bits for i in mine} & {i.int & random_bits for i in theirs}


def test_request_context_layers_and_resets() -> None:
    assert current_context().tenant_id is None
    with request_context(tenant_id="t", correlation_id="c"):
        with request_context(user_id="u") as inner:
            assert (inner.tenant_id, inner.correlation_id, inner.user_id) == ("t", "c", "u")
        assert current_context().user_id is None
        with system_context() as sys_ctx:
            assert sys_ctx.system and sys_ctx.tenant_id == "t"
        assert not current_context().system
    assert current_context().tenant_id is None


def test_request_context_rejects_non_string_ids() -> None:
    with pytest.raises(ConfigurationError, match="tenant_id"), request_context(tenant_id=5):  # type: ignore[arg-type]
        pass


async def test_request_context_is_per_task() -> None:
    async def read_after(delay: float) -> str | None:
        await asyncio.sleep(delay)
        return current_context().tenant_id

    async def in_tenant(tenant: str) -> str | None:
        with request_context(tenant_id=tenant):
            return await read_after(0.01)

    assert await asyncio.gather(in_tenant("a"), in_tenant("b")) == ["a", "b"]


@dataclass(frozen=True, kw_only=True)
class Happened(DomainEvent):
    n: int


@dataclass(frozen=True, kw_only=True)
class Published(IntegrationEvent):
    name = "tests.published"
    version = 2
    n: int


def test_integration_event_wire_name_is_validated() -> None:
    assert Published.wire_name() == "tests.published"
    with pytest.raises(ConfigurationError, match="lowercase wire name"):

        @dataclass(frozen=True, kw_only=True)
        class Bad(IntegrationEvent):
            name = "Has Spaces"

    with pytest.raises(ConfigurationError, match="positive int"):

        @dataclass(frozen=True, kw_only=True)
        class BadVersion(IntegrationEvent):
            name = "ok.name"
            version = 0

    @dataclass(frozen=True, kw_only=True)
    class Abstract(IntegrationEvent):
        pass

    with pytest.raises(ConfigurationError, match="no wire name"):
        Abstract.wire_name()


def test_events_have_ids_and_aware_timestamps() -> None:
    a, b = Happened(n=1), Happened(n=2)
    assert isinstance(a.event_id, UUID) and a.event_id < b.event_id
    assert a.occurred_at.tzinfo is not None


@dataclass(eq=False, kw_only=True)
class Thing(AggregateRoot):
    n: int = 0


def test_aggregate_records_lazily_and_collects_once() -> None:
    thing = Thing.__new__(Thing)  # as SQLAlchemy loads it: __init__ never runs
    assert thing.pending_events == ()
    thing.record(Happened(n=1))
    thing.record(Happened(n=2))
    assert [e.n for e in thing.pending_events] == [1, 2]  # type: ignore[attr-defined]
    records = thing.collect_events()
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    assert all(r.aggregate is thing for r in records)
    assert thing.collect_events() == [] and not thing.has_pending_events()


def test_recorded_events_stay_out_of_the_instance_dict_and_the_dataclass() -> None:
    thing = Thing(n=3)
    thing.record(Happened(n=1))
    # The object's __dict__ (where the ORM keeps mapped state) holds its fields only; the
    # events are not a field: equality, repr and replace() never see them.
    assert vars(thing) == {"n": 3}
    assert "Happened" not in repr(thing)
    assert replace(thing, n=4).pending_events == ()
    assert [e.n for e in thing.pending_events] == [1]  # type: ignore[attr-defined]
    # A copy is a value copy of the object, events included (as with any attribute).
    twin = copy.copy(thing)
    assert len(twin.pending_events) == 1 and vars(twin) == {"n": 3}


def test_aggregate_refuses_non_events() -> None:
    with pytest.raises(ConfigurationError):
        Thing().record("not an event")  # type: ignore[arg-type]


async def test_dispatcher_matches_class_hierarchy_in_order() -> None:
    dispatcher = InProcessDispatcher()
    seen: list[str] = []

    async def specific(event: Happened, uow: Any) -> None:
        seen.append(f"specific:{event.n}")

    async def general(event: DomainEvent, uow: Any) -> None:
        seen.append("general")

    dispatcher.subscribe(DomainEvent, general)
    dispatcher.subscribe(Happened, specific)
    await dispatcher.dispatch(Happened(n=3), None)
    await dispatcher.dispatch(Published(n=1), None)
    assert seen == ["specific:3", "general"]


def test_dispatcher_refuses_sync_handlers_and_non_events() -> None:
    dispatcher = InProcessDispatcher()
    with pytest.raises(ConfigurationError, match="async function"):
        dispatcher.subscribe(Happened, lambda e, u: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="Event classes"):
        dispatcher.subscribe(int, lambda e, u: None)  # type: ignore[arg-type,return-value]


def test_fixed_clock_needs_aware_time() -> None:
    from datetime import datetime, timedelta

    with pytest.raises(ConfigurationError):
        FixedClock(datetime(2030, 1, 1))
    from datetime import UTC

    clock = FixedClock(datetime(2030, 1, 1, tzinfo=UTC))
    clock.advance(timedelta(seconds=5))
    assert clock.now().second == 5
