"""Turning integration events into outbox rows.

Payloads are serialized through a pydantic ``TypeAdapter`` per event class, built once and
cached, so UUIDs, Decimals, datetimes, enums and nested dataclasses become JSON without
per-call introspection. The envelope fields (id, name, version, aggregate, context ids) live
in columns, not in the payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError

from qx.core._context import RequestContext
from qx.core._errors import ConfigurationError
from qx.core._events import IntegrationEvent
from qx.core._telemetry import trace_headers
from qx.outbox._table import lane_of

__all__ = ["event_payload", "outbox_row"]

_ENVELOPE_FIELDS = {"event_id", "occurred_at"}


_adapters: dict[type[IntegrationEvent], tuple[TypeAdapter[Any], str, int]] = {}


def _adapter(event_type: type[IntegrationEvent]) -> tuple[TypeAdapter[Any], str, int]:
    found = _adapters.get(event_type)
    if found is not None:
        return found
    name = event_type.wire_name()
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(event_type)
    except Exception as exc:
        raise ConfigurationError(
            f"cannot build a serializer for {event_type.__qualname__}: {exc}"
        ) from exc
    found = _adapters[event_type] = (adapter, name, event_type.version)
    return found


def event_payload(event: IntegrationEvent) -> dict[str, Any]:
    """Return the JSON-ready payload of an integration event (envelope fields excluded).

    Raises:
        ConfigurationError: the event class has no wire name or a field is not serializable.
    """
    adapter, _, _ = _adapter(type(event))
    try:
        payload: dict[str, Any] = adapter.dump_python(event, mode="json", exclude=_ENVELOPE_FIELDS)
    except PydanticSerializationError as exc:
        raise ConfigurationError(
            f"cannot serialize {type(event).__qualname__} for the outbox: {exc}"
        ) from exc
    return payload


def outbox_row(
    event: IntegrationEvent,
    *,
    aggregate_type: str | None,
    aggregate_id: str | None,
    ctx: RequestContext,
    correlation_id: str,
    causation_id: str | None,
    tenant_id: str | None,
    trace: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build the ``qx_outbox`` row for one event.

    ``tenant_id``: the tenant the row belongs to (the aggregate's, or the context's for an
    event of no tenant-scoped aggregate).

    ``trace``: the trace-context headers to store (default: the current span's when tracing
    is on, else the request context's ``traceparent``); the relay and consumers continue
    the trace from them.
    """
    _, name, version = _adapter(type(event))
    headers = dict(trace_headers(ctx.traceparent) if trace is None else trace)
    if ctx.user_id is not None:
        headers["user_id"] = ctx.user_id
    return {
        "id": event.event_id,
        "event_name": name,
        "event_version": version,
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "payload": event_payload(event),
        "headers": headers,
        "occurred_at": event.occurred_at,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "tenant_id": tenant_id,
        "lane": lane_of(aggregate_type, aggregate_id, event.event_id),
    }
