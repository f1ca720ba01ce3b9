"""``OutboxStage``: the commit stage that writes integration events to ``qx_outbox``.

In the transaction, after the flush, it inserts one row per integration event the commit
settled (one statement for all of them), stamped with the request context's ids, the
aggregate's type, id and tenant, and the trace to continue. After COMMIT, when it wrote
rows, it wakes the relays (:class:`~qx.outbox._wakeup.RelayWakeup`). Every
:class:`~qx.db.UnitOfWorkFactory` gets one by default (the ``qx.commit_stages`` entry
point); pass ``stages=[OutboxStage(...)]`` to configure it.

Example:
    >>> factory = UnitOfWorkFactory(Orders, sessions,
    ...                             stages=[OutboxStage(wake_relays=False)])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert

from qx.core._aggregate import RecordedEvent
from qx.core._context import current_context
from qx.core._events import Event, IntegrationEvent
from qx.core._telemetry import trace_headers
from qx.db._mapping import entity_info
from qx.db._pipeline import CommitContext
from qx.db._writes import WriteStatement
from qx.outbox._recorder import outbox_row
from qx.outbox._table import outbox_table
from qx.outbox._wakeup import RelayWakeup

__all__ = ["OutboxStage", "build_outbox_rows"]

# Built once: a statement object keeps its cache key (see WriteStatement). An outbox row's
# key is its event's id, made new for the event: found by it after a lost answer, the row
# is this commit's (a commit of nothing else can go as one statement, without BEGIN).
_INSERT = WriteStatement(
    insert(outbox_table),
    fresh_key="id",
    absent=(
        f"the database has no {outbox_table.name} table: run qx's migrations "
        "(qx db upgrade, or await qx.migrations.upgrade(engine)) or add "
        "include_qx_tables(metadata) to the metadata your migrations create"
    ),
)


class OutboxStage:
    """Writes the commit's integration events to the outbox and wakes the relays.

    Args:
        wake_relays: after a commit that wrote rows, tell listening relays at once
            (PostgreSQL ``NOTIFY``, sent after COMMIT); ``False`` leaves them to their poll.

    Attributes:
        name: ``"outbox"`` (the commit's span carries ``qx.outbox.rows``).
        accepts: ``(IntegrationEvent,)``.
    """

    name = "outbox"
    accepts: tuple[type[Event], ...] = (IntegrationEvent,)

    def __init__(self, *, wake_relays: bool = True) -> None:
        self.wake_relays = wake_relays
        self._wakeup: RelayWakeup | None = None

    async def before_commit(self, commit: CommitContext) -> int:
        """Insert the rows of the commit's integration events; return how many."""
        if not any(isinstance(record.event, IntegrationEvent) for record in commit.records):
            return 0  # no correlation id generated, no context looked up
        rows = build_outbox_rows(commit.records, correlation_id=commit.correlation_id)
        # Held back to go with the commit's other rows (a missing table: _INSERT's absent).
        await commit.insert(_INSERT, rows)
        return len(rows)

    async def after_commit(self, commit: CommitContext, written: int) -> None:
        """Wake the relays: a NOTIFY is sent after this COMMIT (not waited for)."""
        if not self.wake_relays or commit.engine is None:
            return  # bound to a connection: an outer transaction commits, not this one
        wakeup = self._wakeup
        if wakeup is None or wakeup.engine is not commit.engine:
            wakeup = self._wakeup = RelayWakeup(commit.engine)
        await wakeup.committed()

    async def settled(self) -> None:
        """Return once every wake-up asked for has been sent (tests, an orderly shutdown)."""
        if self._wakeup is not None:
            await self._wakeup.settled()

    def __repr__(self) -> str:
        return f"OutboxStage(wake_relays={self.wake_relays})"


def build_outbox_rows(
    records: Sequence[RecordedEvent], *, correlation_id: str
) -> list[dict[str, Any]]:
    """The ``qx_outbox`` rows of the integration events among ``records``: stamped with the
    context's ids, the aggregate's type, id and tenant (the aggregate's own tenant when it
    has a tenant column, else the request context's)."""
    rows: list[dict[str, Any]] = []
    ctx = current_context()
    trace = trace_headers(ctx.traceparent)  # the commit's span: one lookup for every row
    for record in records:
        if not isinstance(record.event, IntegrationEvent):
            continue
        aggregate_type = aggregate_id = None
        tenant = ctx.tenant_id
        if record.aggregate is not None:
            info = entity_info(type(record.aggregate))
            aggregate_type, aggregate_id = info.name, info.identity(record.aggregate)
            if info.tenant_key is not None:
                tenant = getattr(record.aggregate, info.tenant_key)
        rows.append(
            outbox_row(
                record.event,
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                ctx=ctx,
                correlation_id=correlation_id,
                causation_id=(
                    str(record.causation_id) if record.causation_id else ctx.causation_id
                ),
                trace=trace,
                tenant_id=tenant,
            )
        )
    return rows
