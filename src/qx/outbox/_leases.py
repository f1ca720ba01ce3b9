"""Lane leases shared fairly among the live members of a group: the one rule behind the
relays' lanes (``qx_outbox_lane``) and a consumer group's partitions (``qx_inbox_lane``).

A member heartbeats in its group's member table and holds a fair share of the lanes: the
live members, sorted, take ``lanes // n`` each and the first ``lanes % n`` one more, so the
shares add up to every lane. Taking a lane (free, or its lease run out) bumps its fencing
token; renewing keeps it. A member over its share gives back its highest lanes, each once
it has nothing in flight there (until then the lane is *draining*); a member under its
share takes free lanes, lowest first. A member that stops cleanly releases everything; one
that dies loses its lanes when their lease ends, and the others take them.

Example:
    >>> fair_share("b", ["a", "b", "c"], lanes=8)
    3
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Table, and_, delete, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from qx.db._dialect_base import Dialect

__all__ = ["LeaseBook", "Leases", "fair_share"]


def fair_share(member: str, alive: Sequence[str], *, lanes: int) -> int:
    """The lanes ``member`` should hold among the ``alive`` members: every member
    ``lanes // n``, the first ``lanes % n`` one more. The shares add up to every lane, so
    none is left to nobody; a share of ``ceil(lanes / n)`` for all would let fewer members
    hold every lane (64 lanes: 11 members of 6, the 12th none).
    """
    ranked = sorted(alive)  # in Python: the same order in every member, whatever collation
    count = max(len(ranked), 1)
    base, extra = divmod(lanes, count)
    rank = ranked.index(member) if member in ranked else count - 1
    return base + (1 if rank < extra else 0)


@dataclass(frozen=True, slots=True)
class Leases:
    """The lanes a member holds after :meth:`LeaseBook.lease`.

    Attributes:
        tokens: lane → fencing token.
        draining: lanes being handed over: nothing new started in them, given up once idle.
    """

    tokens: dict[int, int]
    draining: frozenset[int] = frozenset()


@dataclass(slots=True)
class LeaseBook:
    """One group's lanes and members in the database.

    Args:
        lanes_table: one row per lane: ``lane``, ``owner``, ``token``, ``lease_until`` (and
            the ``scope`` columns).
        members_table: one row per member: ``member_column``, ``alive_until`` (and the
            ``scope`` columns).
        member_column: the members table's column naming a member.
        lanes: how many lanes the group has (``0`` … ``lanes - 1``).
        scope: column → value naming the group in both tables (none: one group per table).
    """

    lanes_table: Table
    members_table: Table
    member_column: str
    lanes: int
    scope: Mapping[str, str] = field(default_factory=dict)
    _created: bool = False

    def _of(self, table: Table) -> ColumnElement[bool]:
        return and_(true(), *(table.c[name] == value for name, value in self.scope.items()))

    async def lease(
        self,
        conn: AsyncConnection,
        dialect: Dialect,
        member: str,
        *,
        busy: set[int],
        now: datetime,
        lease_seconds: float,
    ) -> Leases:
        """Heartbeat, renew ``member``'s lanes and move towards its fair share, in the
        caller's transaction.

        Args:
            conn: a connection in a transaction.
            dialect: its backend's strategy.
            member: the member leasing.
            busy: lanes with work in flight (a surplus lane among them drains first).
            now: the time.
            lease_seconds: how long a lease lasts without renewal.
        """
        lanes_t, members_t = self.lanes_table, self.members_table
        in_group = self._of(lanes_t)
        until = now + timedelta(seconds=lease_seconds)
        if not self._created:
            await conn.execute(
                dialect.insert(lanes_t)
                .values([{"lane": lane, "token": 0, **self.scope} for lane in range(self.lanes)])
                .on_conflict_do_nothing()
            )
            self._created = True
        keys = [*(members_t.c[name] for name in self.scope), members_t.c[self.member_column]]
        beat = dialect.insert(members_t).values(
            {self.member_column: member, "alive_until": until, **self.scope}
        )
        await conn.execute(
            beat.on_conflict_do_update(index_elements=keys, set_={"alive_until": until})
        )
        # A lane past the group's count (it had more once) is not renewed: it runs out.
        ours = and_(in_group, lanes_t.c.owner == member)
        renewed = await conn.execute(
            update(lanes_t)
            .where(ours, lanes_t.c.lane < self.lanes)
            .values(lease_until=until)
            .returning(lanes_t.c.lane, lanes_t.c.token)
        )
        mine = {int(lane): int(token) for lane, token in renewed.all()}
        draining: set[int] = set()
        alive = await conn.scalars(
            select(members_t.c[self.member_column]).where(
                self._of(members_t), members_t.c.alive_until > now
            )
        )
        fair = fair_share(member, list(alive), lanes=self.lanes)
        if len(mine) > fair:
            surplus = sorted(mine)[fair:]
            release = [lane for lane in surplus if lane not in busy]
            draining = set(surplus) - set(release)
            if release:
                await conn.execute(
                    update(lanes_t)
                    .where(ours, lanes_t.c.lane.in_(release))
                    .values(owner=None, lease_until=None)
                )
                for lane in release:
                    del mine[lane]
        elif len(mine) < fair:
            free_now = or_(lanes_t.c.lease_until.is_(None), lanes_t.c.lease_until <= now)
            # The free lanes are read first, then taken by their numbers: PostgreSQL runs a
            # "lane IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)" inside the UPDATE once
            # per row it looks at, each run skipping the rows the UPDATE just locked, so the
            # LIMIT bounded nothing and one member took every free lane.
            free = await conn.scalars(
                dialect.for_update(
                    select(lanes_t.c.lane)
                    .where(in_group, lanes_t.c.lane < self.lanes, free_now)
                    .order_by(lanes_t.c.lane)
                    .limit(fair - len(mine)),
                    skip_locked=True,
                )
            )
            taken = await conn.execute(
                update(lanes_t)
                .where(in_group, lanes_t.c.lane.in_(list(free)), free_now)
                .values(owner=member, token=lanes_t.c.token + 1, lease_until=until)
                .returning(lanes_t.c.lane, lanes_t.c.token)
            )
            mine.update({int(lane): int(token) for lane, token in taken.all()})
        if random.random() < 0.01:  # forget members gone for good, now and then
            await conn.execute(
                delete(members_t).where(
                    self._of(members_t), members_t.c.alive_until < now - timedelta(hours=1)
                )
            )
        return Leases(mine, frozenset(draining))

    async def release(self, conn: AsyncConnection, member: str) -> None:
        """Give up every lane and the heartbeat of ``member`` (one that stops cleanly), in
        the caller's transaction."""
        lanes_t, members_t = self.lanes_table, self.members_table
        await conn.execute(
            update(lanes_t)
            .where(self._of(lanes_t), lanes_t.c.owner == member)
            .values(owner=None, lease_until=None)
        )
        await conn.execute(
            delete(members_t).where(self._of(members_t), members_t.c[self.member_column] == member)
        )
