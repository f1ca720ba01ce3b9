"""``ClaimedRow``: what a relay holds of an outbox row it claimed, as one frozen record.

Its fields are, in order, the columns a claim selects (:func:`claimed_columns` builds the
select list from them), so a row of the driver becomes a record positionally, without a
mapping by name. The relay reads attributes, never string keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from sqlalchemy import Text, cast

from qx.outbox._envelope import Envelope, RawJson

__all__ = ["AggregateKey", "ClaimedRow", "Run", "claimed_columns", "sequence_key"]

#: ``(aggregate_type, aggregate_id)`` of a row that has an aggregate.
AggregateKey = tuple[str | None, str]


def sequence_key(key: AggregateKey) -> tuple[str, str]:
    """The key of an aggregate in ``qx_outbox_sequence`` (whose columns are NOT NULL)."""
    return (key[0] or "", key[1])


class ClaimedRow(NamedTuple):
    """An outbox row as a claim returns it: immutable, typed, read by attribute (a named
    tuple: a relay builds one per row, and a tuple is built from a driver row in one step).

    Attributes:
        position: the outbox position (the order of rows).
        id: the event id, the broker's message id.
        event_name / event_version: the event's wire name and schema version.
        aggregate_type / aggregate_id: the aggregate that recorded it (``None`` when none).
        payload / headers: JSON text, embedded in envelopes as is.
        occurred_at: when the event occurred.
        correlation_id / causation_id / tenant_id: the request context it was recorded in.
        attempts: failed publishes so far.
        lane: the lane it lives in.
        aggregate_seq: its number among its aggregate's events, once numbered.
        next_attempt_at: when it is due (``None``: ready).
        dead_at: when it was dead-lettered.
        blocker: the nearest earlier unpublished row of its aggregate, when the claim
            asked (``None``: it is its aggregate's head).
    """

    position: int
    id: UUID
    event_name: str
    event_version: int
    aggregate_type: str | None
    aggregate_id: str | None
    payload: str
    headers: str | None
    occurred_at: datetime
    correlation_id: str | None
    causation_id: str | None
    tenant_id: str | None
    attempts: int
    lane: int
    aggregate_seq: int | None
    next_attempt_at: datetime | None
    dead_at: datetime | None
    blocker: int | None = None

    @classmethod
    def of(cls, values: Sequence[Any]) -> ClaimedRow:
        """The record of a row selected by :func:`claimed_columns` (plus the blocker)."""
        return cls(*values)

    @property
    def key(self) -> AggregateKey | None:
        """Its aggregate, ``None`` for a row without one."""
        return None if self.aggregate_id is None else (self.aggregate_type, self.aggregate_id)

    def numbered(self, seq: int) -> ClaimedRow:
        """This row carrying number ``seq`` among its aggregate's events."""
        return self._replace(aggregate_seq=seq)

    def envelope(self, *, source: str) -> Envelope:
        """The envelope the broker gets for this row."""
        headers = Envelope.parse_headers(self.headers)
        return Envelope(
            id=self.id,
            type=self.event_name,
            version=self.event_version,
            time=self.occurred_at,
            source=source,
            data=RawJson(self.payload),
            aggregate_type=self.aggregate_type,
            aggregate_id=self.aggregate_id,
            correlation_id=self.correlation_id,
            causation_id=self.causation_id,
            tenant_id=self.tenant_id,
            traceparent=headers.pop("traceparent", None),
            headers=headers,
            position=self.position,
            sequence=self.aggregate_seq,
        )


#: One aggregate's claimed rows in publishing order (a row without aggregate: alone).
Run = list[ClaimedRow]

_COLUMNS = tuple(name for name in ClaimedRow._fields if name != "blocker")


def claimed_columns(t: Any) -> tuple[Any, ...]:
    """The select list of :class:`ClaimedRow` from ``t`` (the outbox or an alias of it), in
    its field order; payload and headers as JSON text."""
    return tuple(
        cast(t.c[name], Text).label(name) if name in ("payload", "headers") else t.c[name]
        for name in _COLUMNS
    )
