"""A unit of work is freed by reference counting when its block ends, on every backend.

A unit of work holds its repositories; a repository used to hold its unit of work back,
so every unit of work that touched one (with its session, identity map and transaction
state) waited for the cyclic garbage collector. With the collector off, the unit of work
must be gone as soon as the last reference to it is dropped: after reads, after a commit
that dispatched events, after a failed block.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest

from qx.core import InProcessDispatcher
from qx.db import UnitOfWorkFactory
from qx.errors import UnitOfWorkError
from tests import models

Factory = UnitOfWorkFactory[models.AppUnitOfWork]


async def _opened(factory: Factory) -> Any:
    async with factory() as uow:
        counter = models.Counter(name="freed")
        await uow.counters.add(counter)
        await uow.commit()
    return counter.id


@pytest.mark.usefixtures("collector_off")
async def test_a_unit_of_work_that_read_through_a_repository_is_freed_at_once(
    uow_factory: Factory,
) -> None:
    ident = await _opened(uow_factory)
    async with uow_factory() as uow:
        assert await uow.counters.get(ident) is not None
        await uow.counters.list(name="freed")
    gone = weakref.ref(uow)
    session = weakref.ref(uow._session)  # type: ignore[arg-type]
    del uow
    assert gone() is None
    assert session() is None


@pytest.mark.usefixtures("collector_off")
async def test_a_unit_of_work_that_committed_events_is_freed_at_once(
    uow_factory: Factory, dispatcher: InProcessDispatcher
) -> None:
    handled: list[Any] = []

    async def note(event: models.Incremented, _uow: Any) -> None:
        handled.append(event)

    dispatcher.subscribe(models.Incremented, note)
    ident = await _opened(uow_factory)
    async with uow_factory() as uow:
        (await uow.counters.require(ident)).increment(integration=True)
        await uow.commit()
    assert len(handled) == 1
    gone = weakref.ref(uow)
    del uow
    assert gone() is None


@pytest.mark.usefixtures("collector_off")
async def test_a_unit_of_work_left_by_an_error_is_freed_at_once(uow_factory: Factory) -> None:
    ident = await _opened(uow_factory)
    with pytest.raises(RuntimeError):
        async with uow_factory() as uow:
            (await uow.counters.require(ident)).increment()
            raise RuntimeError("the block failed")
    gone = weakref.ref(uow)
    del uow
    assert gone() is None


async def test_a_repository_kept_after_its_unit_of_work_ended_refuses_to_run(
    uow_factory: Factory,
) -> None:
    ident = await _opened(uow_factory)
    async with uow_factory() as uow:
        counters = uow.counters
    with pytest.raises(UnitOfWorkError, match=r"closed|ended"):
        await counters.get(ident)
    del uow
    with pytest.raises(UnitOfWorkError, match="has ended"):
        await counters.get(ident)
