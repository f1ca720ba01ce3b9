"""The commit as a pipeline: what packages above ``qx.db`` add to every commit.

A unit of work's commit runs: collect the recorded events → dispatch them in the
transaction → flush → each :class:`CommitStage`'s ``before_commit`` → COMMIT → each stage's
``after_commit`` (those that wrote something) → the unit of work's own after-commit hooks.
The database layer owns the order and the failure rules (any failure before COMMIT rolls
everything back and gives the aggregates their events back); a stage owns what it writes.
The outbox is such a stage (:class:`qx.outbox.OutboxStage`): it lives in ``qx.outbox`` and
plugs in from above, so ``qx.db`` imports nothing of it.

A :class:`~qx.db.UnitOfWorkFactory` given no ``stages`` uses the installed defaults: the
``qx.commit_stages`` entry points (qx registers its outbox there), one new stage per
factory. A commit that recorded integration events and has no stage that takes them fails
with ``ConfigurationError`` before anything is written: an event is never dropped because
a stage was left out.

Example:
    >>> class AuditStage:                                      # doctest: +SKIP
    ...     name = "audit"
    ...     accepts = ()
    ...     async def before_commit(self, commit: CommitContext) -> int:
    ...         conn = await commit.connection()
    ...         await conn.execute(insert(audit), [{"n": len(commit.records)}])
    ...         return 1
    ...     async def after_commit(self, commit: CommitContext, written: int) -> None:
    ...         pass
    >>> factory = UnitOfWorkFactory(Orders, sessions, stages=[OutboxStage(), AuditStage()])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from qx.core._aggregate import RecordedEvent
from qx.core._errors import ConfigurationError
from qx.core._events import Event, IntegrationEvent
from qx.db._writes import WriteStatement, defer_write, send_pending

__all__ = [
    "STAGE_ENTRY_POINTS",
    "CommitContext",
    "CommitStage",
    "default_stages",
    "unclaimed",
]

STAGE_ENTRY_POINTS = "qx.commit_stages"
"""The entry-point group whose objects (zero-argument callables returning a
:class:`CommitStage`) make a factory's default stages."""


@dataclass(frozen=True, slots=True)
class CommitContext:
    """What a stage sees of one commit.

    Attributes:
        records: the events the commit settled (every dispatch round), in recording order.
        session: the unit of work's session (flushed: generated keys are known). The new
            aggregates' rows may still be held back, to go with the stages' rows in one
            statement: read through :meth:`connection`, which sends them first.
        engine: the engine the unit of work commits through, or ``None`` when its session
            factory is bound to a connection (an outer transaction commits).
    """

    records: Sequence[RecordedEvent]
    session: AsyncSession
    engine: AsyncEngine | None
    _correlation: Callable[[], str] = field(repr=False)

    @property
    def correlation_id(self) -> str:
        """The unit of work's correlation id (generated on first use)."""
        return self._correlation()

    async def connection(self) -> AsyncConnection:
        """The transaction's connection, for statements outside the ORM. The rows qx held
        back to send with the stages' rows are sent first, so statements read them."""
        await self.session.run_sync(send_pending)
        return await self.session.connection()

    async def insert(
        self, statement: Insert | WriteStatement, rows: Sequence[dict[str, Any]]
    ) -> None:
        """INSERT ``rows`` in the transaction. They are held back, like the new aggregates'
        rows, and sent with them just before COMMIT (or before a statement of the
        transaction: :meth:`connection` sends them first), as one statement where the
        backend can. Where the backend can, that statement names the transaction, and
        COMMIT then needs no question of its own to be safe against a lost answer; where
        it is all the transaction writes and one of its rows has a key made for it
        (``WriteStatement(..., fresh_key=...)``), it is sent as a transaction of its own,
        without BEGIN and COMMIT (see ``qx.db._writes``). So a database error of these
        rows is raised by the commit, after the stages ran.

        A stage that inserts on every commit passes a ``WriteStatement`` it built once: a
        bare ``Insert`` is walked again each time to find its compiled form."""
        if not isinstance(statement, WriteStatement):
            statement = WriteStatement(statement)
        await self.session.run_sync(defer_write, statement, list(rows))


@runtime_checkable
class CommitStage(Protocol):
    """A step of every commit, added by a package above the database layer.

    Attributes:
        name: short name; the commit's span carries ``qx.<name>.rows``.
        accepts: the event classes this stage delivers (the outbox: ``IntegrationEvent``).
    """

    name: str
    accepts: tuple[type[Event], ...]

    async def before_commit(self, commit: CommitContext) -> int:
        """Write inside the transaction, after the flush; return the rows written. An
        exception rolls the whole unit of work back."""
        ...

    async def after_commit(self, commit: CommitContext, written: int) -> None:
        """Called after COMMIT, only when ``before_commit`` wrote something; must not raise
        for anything but cancellation (the data is committed)."""
        ...


@cache
def _stage_factories() -> tuple[Callable[[], CommitStage], ...]:
    # Read once per process: the installed distributions do not change under it.
    found = sorted(entry_points(group=STAGE_ENTRY_POINTS), key=lambda ep: ep.name)
    factories = []
    for point in found:
        try:
            factories.append(point.load())
        except Exception as exc:
            raise ConfigurationError(
                f"cannot load the commit stage {point.name!r} ({point.value}): {exc}"
            ) from exc
    return tuple(factories)


def default_stages() -> tuple[CommitStage, ...]:
    """New instances of the installed default stages (the ``qx.commit_stages`` entry points,
    by name)."""
    stages = []
    for make in _stage_factories():
        stage = make()
        if not isinstance(stage, CommitStage):
            raise ConfigurationError(
                f"{STAGE_ENTRY_POINTS} entry point {make!r} made {stage!r}, not a CommitStage"
            )
        stages.append(stage)
    return tuple(stages)


def unclaimed(stages: Sequence[CommitStage]) -> type[Event] | None:
    """``IntegrationEvent`` when none of ``stages`` delivers integration events, else
    ``None``: what a commit must refuse rather than drop."""
    for stage in stages:
        if any(issubclass(IntegrationEvent, kind) for kind in stage.accepts):
            return None
    return IntegrationEvent
