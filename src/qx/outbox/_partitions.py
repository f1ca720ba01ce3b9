"""``PartitionMember``: one member of a consumer group holding its share of the group's
partitions, one subscriber per partition held.

With ``QX_BROKER__PARTITIONS`` = N, every event goes to the partition of its aggregate
(:mod:`qx.outbox._destinations`), and a consumer group's partitions are leased to its
members in the consumer's database (``qx_inbox_lane``, ``qx_inbox_member``), by the rule the
relays lease their lanes with (:mod:`qx.outbox._leases`): each live member holds a fair
share, renews it every third of ``lease_seconds``, and runs a subscriber on each partition
it holds. So an aggregate's events are handled by exactly one member of the group at a
time, in order, one at a time: N processes share the work, and a member that dies (kill -9,
a partition from the database) loses its partitions when their lease ends; the others
take them and read on from where the broker's consumer state says.

A member that cannot renew stops its subscribers before its lease runs out (a quarter of
``lease_seconds`` early), so by the time another member may take a partition nobody reads
it here. A member joining makes the others' shares smaller: each stops the subscriber of a
partition it gives up, and releases the partition once the subscriber returned (the
handler in progress finished). What can still overlap - a member paused longer than its
lease (a stopped process, a stalled event loop) that wakes with a message in hand - is
absorbed by the inbox: an aggregate's sequence row admits each event once, in order.

Example:
    >>> member = PartitionMember(engine, group="billing", member="host-1",
    ...                          partitions=16, lease_seconds=10,
    ...                          subscriber=make_subscriber)            # doctest: +SKIP
    >>> await member.run(stop)                                         # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core._backoff import Backoff
from qx.core._clock import utcnow
from qx.core._errors import ConfigurationError
from qx.db._dialect import dialect_named
from qx.outbox._leases import LeaseBook
from qx.outbox._signals import pause
from qx.outbox._table import inbox_lane_table, inbox_member_table

__all__ = ["PartitionMember", "Runs"]

logger = logging.getLogger("qx.outbox.partitions")

#: How long a member waits before leasing again after the database failed it.
_AGAIN = Backoff(0.2, 5.0)


class Runs(Protocol):
    """A subscriber: consumes until ``stop`` is set."""

    def run(self, stop: asyncio.Event) -> Coroutine[Any, Any, None]:
        """Consume until ``stop`` is set."""
        ...


@dataclass(slots=True)
class _Running:
    stop: asyncio.Event
    task: asyncio.Task[None]


class PartitionMember:
    """One member of a consumer group: leases its share of the partitions and runs a
    subscriber on each (see the module docstring).

    Args:
        engine: the consumer's database (where its inbox is).
        group: the consumer group (the inbox's consumer name).
        member: this member's name, unique in the group (host, process, a counter).
        partitions: how many partitions the group has (``QX_BROKER__PARTITIONS``).
        lease_seconds: how long a partition stays this member's without renewal: a dead
            member's partitions are taken over within about this long.
        subscriber: makes the subscriber of one partition.

    Attributes:
        held: the partitions this member reads now.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        group: str,
        member: str,
        partitions: int,
        lease_seconds: float,
        subscriber: Callable[[int], Runs],
    ) -> None:
        if not partitions >= 1:
            raise ConfigurationError(f"partitions must be >= 1, got {partitions!r}")
        if not lease_seconds > 0:
            raise ConfigurationError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        self.engine = engine
        self.member = member
        self.lease_seconds = lease_seconds
        self._subscriber = subscriber
        self._dialect = dialect_named(engine.dialect.name)
        self._book = LeaseBook(
            inbox_lane_table, inbox_member_table, "member_id", partitions, {"consumer": group}
        )
        self._running: dict[int, _Running] = {}
        self.held: frozenset[int] = frozenset()

    async def run(self, stop: asyncio.Event) -> None:
        """Hold a share of the partitions and consume them until ``stop`` is set; then stop
        every subscriber and give the partitions back."""
        held_until = 0.0  # time.monotonic() at which the leases held run out
        failures = 0
        try:
            while not stop.is_set():
                self._reap()
                started = time.monotonic()
                try:
                    async with asyncio.timeout(self.lease_seconds / 3):
                        async with self.engine.begin() as conn:
                            leases = await self._book.lease(
                                conn,
                                self._dialect,
                                self.member,
                                busy=set(self._running),
                                now=utcnow(),
                                lease_seconds=self.lease_seconds,
                            )
                except Exception as exc:
                    failures += 1
                    logger.warning(
                        "%s cannot renew its partitions (%s: %s)",
                        self.member,
                        type(exc).__name__,
                        exc,
                    )
                    if time.monotonic() >= held_until - self.lease_seconds / 4:
                        # Our leases are running out: another member may take them soon.
                        self._hold(frozenset())
                    await pause(stop, _AGAIN.delay(failures))
                    continue
                failures = 0
                held_until = started + self.lease_seconds
                self._hold(frozenset(leases.tokens) - leases.draining)
                await pause(stop, self.lease_seconds / 3)
        finally:
            self._hold(frozenset())
            await asyncio.gather(
                *(running.task for running in self._running.values()), return_exceptions=True
            )
            self._running.clear()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.lease_seconds / 3):
                    async with self.engine.begin() as conn:
                        await self._book.release(conn, self.member)

    def _hold(self, partitions: frozenset[int]) -> None:
        """Run a subscriber on each of ``partitions`` and ask the others' to stop (they are
        released once they returned: see ``busy``)."""
        if partitions != self.held:
            logger.info("%s holds partitions %s", self.member, sorted(partitions) or "none")
        self.held = partitions
        for partition, running in self._running.items():
            if partition not in partitions:
                running.stop.set()
        for partition in partitions - set(self._running):
            lane_stop = asyncio.Event()
            task = asyncio.create_task(self._subscriber(partition).run(lane_stop))
            self._running[partition] = _Running(lane_stop, task)

    def _reap(self) -> None:
        """Forget the subscribers that returned; one that failed on its configuration fails
        the member."""
        for partition, running in list(self._running.items()):
            if not running.task.done():
                continue
            del self._running[partition]
            error = None if running.task.cancelled() else running.task.exception()
            if error is not None:
                raise error
