"""``past_cancellation``: a step that must not stop half-way finishes, then the caller's
cancellation goes on (with the step's failure as its cause when it failed)."""

from __future__ import annotations

import asyncio

import pytest

from qx.db._commit import past_cancellation


async def _step(done: list[str], gate: asyncio.Event, *, fail: bool = False) -> None:
    await gate.wait()
    if fail:
        raise RuntimeError("the step failed")
    done.append("finished")


async def test_a_step_not_cancelled_reports_no_cancellation() -> None:
    gate, done = asyncio.Event(), []
    gate.set()
    assert await past_cancellation(_step(done, gate)) is False
    assert done == ["finished"]


async def test_a_cancellation_waits_for_the_step_and_is_reported() -> None:
    gate, done = asyncio.Event(), []
    caller = asyncio.create_task(past_cancellation(_step(done, gate)))
    await asyncio.sleep(0)  # the step is waiting on the gate
    caller.cancel()
    caller.cancel()  # twice: still waits
    await asyncio.sleep(0)
    assert not caller.done()
    gate.set()
    assert await caller is True
    assert done == ["finished"]


async def test_a_failed_step_after_a_cancellation_raises_the_cancellation_from_it() -> None:
    gate: asyncio.Event = asyncio.Event()
    caller = asyncio.create_task(past_cancellation(_step([], gate, fail=True)))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(asyncio.CancelledError) as caught:
        await caller
    assert isinstance(caught.value.__cause__, RuntimeError)


async def test_a_failed_step_without_cancellation_raises_its_error() -> None:
    gate: asyncio.Event = asyncio.Event()
    gate.set()
    with pytest.raises(RuntimeError, match="the step failed"):
        await past_cancellation(_step([], gate, fail=True))
