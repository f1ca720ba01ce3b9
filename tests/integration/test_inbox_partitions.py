"""Partitioned consumption (``QX_BROKER__PARTITIONS``): a consumer group's members share its
partitions by leases in the consumer's database, so each aggregate's events are handled by
exactly one member at a time, in order, on NATS, RabbitMQ and Redis.

The handler keeps no guard and knows nothing of partitions: it increments the aggregate's
counter and, after the commit, notes the event's number and the member that applied it.
Three members share six partitions; one stops (its partitions go to the others at once) and
one dies without a word (its partitions go to the others once its lease runs out)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id, request_context
from qx.db import UnitOfWorkFactory
from qx.errors import PublishError
from qx.outbox import Envelope, EventRouter, Inbox
from qx.outbox._consumer import subscriber_from_settings
from qx.outbox._destinations import partition_of
from qx.outbox._partitions import PartitionMember
from qx.outbox._table import inbox_lane_table
from qx.outbox.publishers import publisher_from_settings
from qx.settings import BrokerSettings
from tests import models
from tests.integration.helpers import drop_stream, until
from tests.integration.test_inbox_order import counters, numbered
from tests.services import AMQP, NATS, REDIS, Service, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]

#: The member whose subscriber runs the handler (each member's task sets it).
WHO: ContextVar[str] = ContextVar("who")
PARTITIONS = 6
LEASE = 3.0


@pytest.fixture
def backend() -> str:
    return "postgresql"


@dataclass
class Applied:
    """What the handler saw committed: per aggregate, (number, member) in commit order."""

    log: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def numbers(self, aggregate: UUID) -> list[int]:
        return [number for number, _ in self.log.get(str(aggregate), [])]

    def members(self, aggregate: UUID, *, after: int = 0) -> set[str]:
        return {who for number, who in self.log.get(str(aggregate), []) if number > after}


def recording_router() -> tuple[EventRouter, Applied]:
    router, applied = EventRouter(), Applied()

    @router.on("tests.counter_changed")
    async def apply(envelope: Envelope, uow: models.AppUnitOfWork) -> None:
        counter = await uow.counters.require(envelope.data["counter_id"])
        counter.increment()
        entry = (int(envelope.sequence or 0), WHO.get())
        aggregate = str(envelope.aggregate_id)
        uow.on_commit(lambda: applied.log.setdefault(aggregate, []).append(entry))

    return router, applied


@dataclass
class Group:
    """Members of one consumer group, each in its own task, stopped or killed one by one."""

    engine: AsyncEngine
    settings: BrokerSettings
    inbox: Inbox[Any]
    router: EventRouter
    name: str
    members: dict[str, PartitionMember] = field(default_factory=dict)
    stops: dict[str, asyncio.Event] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start(self, who: str) -> None:
        def subscriber(partition: int) -> Any:
            return subscriber_from_settings(
                self.settings,
                self.inbox,
                self.router,
                name=self.name,
                partition=partition,
                redeliver_after=LEASE,
            )

        member = PartitionMember(
            self.engine,
            group=self.name,
            member=who,
            partitions=PARTITIONS,
            lease_seconds=LEASE,
            subscriber=subscriber,
        )
        stop = asyncio.Event()

        async def run() -> None:
            WHO.set(who)  # the subscribers' tasks, created in this one, inherit it
            await member.run(stop)

        self.members[who], self.stops[who] = member, stop
        self.tasks[who] = asyncio.create_task(run())

    async def stop(self, who: str) -> None:
        self.stops[who].set()
        await asyncio.wait_for(self.tasks.pop(who), 30)
        del self.members[who]

    async def kill(self, who: str) -> None:
        """Gone without a word: its tasks cancelled, and a transaction that releases its
        partitions never commits (a process killed -9 cannot release anything)."""
        member = self.members.pop(who)
        member._book = _NeverReleases(member._book)  # type: ignore[assignment]
        self.tasks.pop(who).cancel()
        await asyncio.sleep(0)

    async def owners(self) -> dict[int, str | None]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(inbox_lane_table.c.lane, inbox_lane_table.c.owner).where(
                    inbox_lane_table.c.consumer == self.name
                )
            )
            return {int(lane): owner for lane, owner in rows}

    def held(self) -> dict[str, int]:
        return {who: len(member.held) for who, member in self.members.items()}

    async def close(self) -> None:
        for who in list(self.tasks):
            await self.stop(who)


class _NeverReleases:
    """A lease book whose release is lost with its process."""

    def __init__(self, book: Any) -> None:
        self._book = book

    def __getattr__(self, name: str) -> Any:
        return getattr(self._book, name)

    async def release(self, conn: Any, member: str) -> None:
        raise ConnectionError("the process is gone")


@contextlib.asynccontextmanager
async def broker_for(service: Service, tag: str) -> AsyncIterator[BrokerSettings]:
    url = resolve(service)
    settings = BrokerSettings(
        url=url,
        partitions=PARTITIONS,
        subject_prefix=f"qxp{tag}",
        stream=f"QXP{tag}",
        exchange=f"qxp.{tag}",
        redis_stream=f"qxp:{tag}",
        publish_timeout=5.0,
    )
    try:
        yield settings
    finally:
        if service is NATS:
            await drop_stream(url, settings.stream)
        elif service is AMQP:
            import aio_pika

            connection = await aio_pika.connect(url)
            async with connection:
                channel = await connection.channel()
                for partition in range(PARTITIONS):
                    await channel.queue_delete(f"grp{tag}.p{partition}")
                await channel.exchange_delete(settings.exchange)
        else:
            import redis.asyncio as redis

            client = redis.from_url(url)
            await client.delete(*(f"{settings.redis_stream}.p{k}" for k in range(PARTITIONS)))
            await client.aclose()


async def publish_all(publisher: Any, envelopes: list[Envelope]) -> None:
    """Publish in order; RabbitMQ returns a message no queue is bound for yet (the members
    declare their partitions' queues as they take them), so that one is sent again."""
    for envelope in envelopes:
        deadline = time.monotonic() + 30
        while True:
            try:
                await publisher.publish(envelope)
                break
            except PublishError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("service", [NATS, AMQP, REDIS], ids=["nats", "rabbitmq", "redis"])
async def test_each_aggregate_is_handled_by_one_member_in_order(
    service: Service, engine: AsyncEngine, uow_factory: Factory
) -> None:
    tag = new_id().hex[-10:]
    router, applied = recording_router()
    idents = await counters(uow_factory, 18)
    async with broker_for(service, tag) as settings:
        publisher = publisher_from_settings(settings)
        await publisher.connect()
        group = Group(
            engine, settings, Inbox(uow_factory, consumer=f"grp{tag}"), router, f"grp{tag}"
        )
        try:
            for who in ("a", "b", "c"):
                group.start(who)

            async def shared_evenly() -> bool:
                owners = await group.owners()
                return sorted(group.held().values()) == [2, 2, 2] and len(owners) == PARTITIONS

            await until(shared_evenly, 30, "three members hold two partitions each")
            # Which aggregates share a partition: the test spreads over all of them.
            assert len({partition_of(settings, numbered(i, 1)) for i in idents}) >= 4
            # Each aggregate goes to whoever holds its partition. Which members that is
            # depends on the random ids: 18 aggregates can leave a member's two partitions
            # unused.
            lanes = await group.owners()
            owner = {i: lanes[partition_of(settings, numbered(i, 1))] for i in idents}

            async def all_applied(upto: int) -> bool:
                return all(len(applied.numbers(i)) >= upto for i in idents)

            first = [numbered(i, n) for n in range(1, 6) for i in idents]
            await publish_all(publisher, first)
            await until(lambda: all_applied(5), 60, "the first five events of each applied")
            for ident in idents:
                assert applied.numbers(ident) == [1, 2, 3, 4, 5]
                assert set(applied.members(ident)) == {owner[ident]}, applied.log[str(ident)]
            assert len(set(owner.values())) >= 2  # the test spans members

            # A member that stops gives its partitions back as it stops (none waits out its
            # lease); the others take them at their next lease.
            held_by_a = {k for k, owner in (await group.owners()).items() if owner == "a"}
            assert len(held_by_a) == 2
            await group.stop("a")
            owners = await group.owners()
            assert {k for k in held_by_a if owners[k] == "a"} == set()

            async def two_share() -> bool:
                return sorted(group.held().values()) == [3, 3]

            await until(two_share, 30, "the two left hold three partitions each")
            await publish_all(publisher, [numbered(i, n) for n in range(6, 11) for i in idents])
            await until(lambda: all_applied(10), 60, "events 6-10 applied")

            # A member that dies releases nothing: its partitions wait out their lease.
            died_at = time.monotonic()
            await group.kill("b")
            await publish_all(publisher, [numbered(i, n) for n in range(11, 16) for i in idents])

            async def taken_over() -> bool:
                owners = await group.owners()
                return set(owners.values()) == {"c"} and group.held() == {"c": PARTITIONS}

            await until(taken_over, LEASE * 4, "the last member holds every partition")
            assert time.monotonic() - died_at < LEASE * 3
            await until(lambda: all_applied(15), 60, "events 11-15 applied")
            for ident in idents:
                assert applied.numbers(ident) == list(range(1, 16)), applied.log[str(ident)]
                # One member at a time: 6-10 by a survivor of "a", 11-15 by "c".
                assert applied.members(ident, after=5) - {"b", "c"} == set()
                assert len({w for n, w in applied.log[str(ident)] if 5 < n <= 10}) == 1
                assert {w for n, w in applied.log[str(ident)] if n > 10} <= {"b", "c"}
            with request_context(tenant_id="t-1"):
                async with uow_factory() as uow:
                    values = [(await uow.counters.require(i)).value for i in idents]
            assert values == [15] * len(idents)  # each event's effect once
        finally:
            await group.close()
            await publisher.close()
