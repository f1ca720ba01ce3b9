"""The message every publisher sends: one JSON envelope per outbox row.

Attribute names follow CloudEvents 1.0 where they fit (``id``, ``source``, ``type``, ``time``,
``subject``, ``datacontenttype``, ``data``); qx's own attributes are CloudEvents-style
extensions (lowercase, no separators): ``eventversion``, ``aggregatetype``, ``aggregateid``,
``correlationid``, ``causationid``, ``tenantid``, ``outboxposition`` (the row's position in
the outbox) and ``aggregatesequence`` (1, 2, 3, ... per aggregate, so a consumer can tell a
gap from a duplicate), and W3C ``traceparent`` when present.

Example:
    >>> from datetime import UTC, datetime
    >>> from uuid import UUID
    >>> env = Envelope(id=UUID(int=1), type="orders.order_placed", version=1,
    ...                time=datetime(2026, 1, 1, tzinfo=UTC), source="shop", data={"n": 1})
    >>> Envelope.from_json(env.to_json()) == env
    True
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from qx.core._errors import InvalidMessage

__all__ = ["Envelope", "RawJson"]

# Strings that need no escaping in JSON: printable ASCII without '"' and '\\'.
_PLAIN = re.compile(r"[ !#-\[\]-~]*")


def _string(value: str) -> str:
    if _PLAIN.fullmatch(value):
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


_PREFIXES: dict[tuple[str, str, int], str] = {}


def _prefix(source: str, type_: str, version: int) -> str:
    """The constant start of every envelope of one event type (cached: types are few)."""
    key = (source, type_, version)
    found = _PREFIXES.get(key)
    if found is None:
        found = (
            f'{{"specversion":"1.0","source":{_string(source)},"type":{_string(type_)},'
            f'"datacontenttype":"application/json","eventversion":{int(version)},"id":"'
        )
        if len(_PREFIXES) < 4096:
            _PREFIXES[key] = found
    return found


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class RawJson(Mapping[str, Any]):
    """A JSON object kept as the text it was read as, parsed only when looked into.

    The relay reads payloads as text and writes them into envelopes unchanged: no parse and
    re-serialisation per message.
    """

    __slots__ = ("_value", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._value: dict[str, Any] | None = None

    def _parsed(self) -> dict[str, Any]:
        if self._value is None:
            value = json.loads(self.text)
            self._value = value if isinstance(value, dict) else {"value": value}
        return self._value

    def __getitem__(self, key: str) -> Any:
        return self._parsed()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def __repr__(self) -> str:
        return f"RawJson({self.text!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One published event.

    Attributes:
        id: the event id (UUIDv7), also the broker's message id for deduplication.
        type: the event's stable wire name (``orders.order_placed``).
        version: the event's schema version.
        time: when the event occurred (UTC).
        source: the publishing service.
        data: the event payload.
        aggregate_type / aggregate_id: the aggregate that recorded it, if any.
        correlation_id / causation_id / tenant_id: from the request context.
        traceparent: W3C trace context, when the request carried one.
        headers: other string headers recorded with the event.
        position: the outbox position of the row it was published from.
        sequence: its number among its aggregate's events (1, 2, 3, ...).
    """

    id: UUID
    type: str
    version: int
    time: datetime
    source: str
    data: Mapping[str, Any]
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tenant_id: str | None = None
    traceparent: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    position: int | None = None
    sequence: int | None = None

    @staticmethod
    def parse_headers(text: str | None) -> dict[str, str]:
        """The headers an outbox row stores as JSON text, as a new dict."""
        if not text or text == "{}":
            return {}
        found = json.loads(text)
        return dict(found) if isinstance(found, dict) else {}

    def trace_context(self) -> dict[str, str] | None:
        """The trace-context headers to continue (``traceparent`` and, for one, the
        ``tracestate`` kept among the headers); ``None`` when the event carries none."""
        if self.traceparent is None:
            return None
        return {**self.headers, "traceparent": self.traceparent}

    def continued(self, trace: Mapping[str, str]) -> Envelope:
        """This envelope carrying ``trace`` (``traceparent``, ``tracestate``, ...) instead of
        its own trace context: what a publisher's span hands on to consumers."""
        if "traceparent" not in trace:
            return self
        headers = {**self.headers, **trace}
        return replace(self, traceparent=headers.pop("traceparent"), headers=headers)

    @property
    def subject(self) -> str | None:
        """``aggregate_type/aggregate_id`` (the CloudEvents ``subject``)."""
        if self.aggregate_type is None or self.aggregate_id is None:
            return None
        return f"{self.aggregate_type}/{self.aggregate_id}"

    def attributes(self) -> dict[str, Any]:
        """The envelope as a CloudEvents-shaped mapping (``None`` attributes left out)."""
        out = self._head()
        out["data"] = dict(self.data)
        return out

    def _head(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "specversion": "1.0",
            "id": str(self.id),
            "source": self.source,
            "type": self.type,
            "time": self.time.isoformat(),
            "datacontenttype": "application/json",
            "eventversion": self.version,
            "subject": self.subject,
            "aggregatetype": self.aggregate_type,
            "aggregateid": self.aggregate_id,
            "correlationid": self.correlation_id,
            "causationid": self.causation_id,
            "tenantid": self.tenant_id,
            "traceparent": self.traceparent,
            "outboxposition": self.position,
            "aggregatesequence": self.sequence,
        }
        out = {key: value for key, value in out.items() if value is not None}
        if self.headers:
            out["headers"] = dict(self.headers)
        return out

    def to_json(self) -> bytes:
        """The envelope as compact UTF-8 JSON (``data`` last).

        Written out by hand: the relay serialises every message, and this is several times
        faster than ``json.dumps`` of the attribute mapping while producing the same JSON.
        """
        parts = [
            _prefix(self.source, self.type, self.version),
            str(self.id),
            '","time":"',
            self.time.isoformat(),
            '"',
        ]
        subject = self.subject
        for name, value in (
            ("subject", subject),
            ("aggregatetype", self.aggregate_type),
            ("aggregateid", self.aggregate_id),
            ("correlationid", self.correlation_id),
            ("causationid", self.causation_id),
            ("tenantid", self.tenant_id),
            ("traceparent", self.traceparent),
        ):
            if value is not None:
                parts += (',"', name, '":', _string(value))
        for name, number in (
            ("outboxposition", self.position),
            ("aggregatesequence", self.sequence),
        ):
            if number is not None:
                parts += (',"', name, '":', str(int(number)))
        if self.headers:
            parts += (',"headers":', _dumps(dict(self.headers)))
        data = self.data.text if isinstance(self.data, RawJson) else _dumps(self.data)
        parts += (',"data":', data, "}")
        return "".join(parts).encode()

    def transport_headers(self) -> dict[str, str]:
        """Short string headers for brokers that carry them beside the body."""
        headers = {
            "ce-id": str(self.id),
            "ce-type": self.type,
            "ce-eventversion": str(self.version),
        }
        for name, value in (
            ("ce-correlationid", self.correlation_id),
            ("ce-tenantid", self.tenant_id),
            ("traceparent", self.traceparent),
        ):
            if value is not None:
                headers[name] = value
        return headers

    @classmethod
    def from_json(cls, body: bytes | str) -> Envelope:
        """Parse an envelope written by :meth:`to_json`.

        Raises:
            InvalidMessage: the body is not a qx envelope.
        """
        try:
            raw = json.loads(body)
            return cls(
                id=UUID(raw["id"]),
                type=raw["type"],
                version=int(raw["eventversion"]),
                time=datetime.fromisoformat(raw["time"]),
                source=raw["source"],
                data=raw["data"],
                aggregate_type=raw.get("aggregatetype"),
                aggregate_id=raw.get("aggregateid"),
                correlation_id=raw.get("correlationid"),
                causation_id=raw.get("causationid"),
                tenant_id=raw.get("tenantid"),
                traceparent=raw.get("traceparent"),
                headers=raw.get("headers") or {},
                position=raw.get("outboxposition"),
                sequence=raw.get("aggregatesequence"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidMessage(f"not a qx envelope: {exc}") from exc
