"""OpenTelemetry tracing, when the ``otel`` extra is installed and the application has set a
tracer provider; otherwise nothing at all (no span objects, no context switches).

qx only uses the OpenTelemetry API: the application chooses the SDK, exporters and the
propagator (W3C trace context by default). Spans follow the database and messaging semantic
conventions: ``qx.uow.commit`` (``db.system.name``, events and outbox rows written),
``qx.bus.command`` (the retries it took), ``send <destination>`` per published message
(``messaging.system``, ``messaging.destination.name``, ``messaging.message.id``) and
``process <destination>`` where a consumer handles it. Trace context travels in the outbox
row's headers, so the consumer's span continues the trace of the request that committed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from qx.core._context import current_context

try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed
    _trace = None  # type: ignore[assignment]
    _propagate = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["active_tracer", "add_event", "span", "trace_headers"]

SpanKind = Literal["internal", "producer", "consumer"]

#: The instrumentation scope of every qx span.
TRACER_NAME = "qx"


def active_tracer() -> Tracer | None:
    """qx's tracer, or ``None`` when tracing is off (no API installed, or no SDK provider
    set yet: the API's default provider records nothing, so qx skips its spans entirely)."""
    if _trace is None:
        return None
    provider = _trace.get_tracer_provider()
    if isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider):
        return None
    return _tracer_of(provider)


@lru_cache(maxsize=8)
def _tracer_of(provider: Any) -> Tracer:
    from qx import __version__

    return provider.get_tracer(TRACER_NAME, __version__)  # type: ignore[no-any-return]


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = "internal",
    attributes: Mapping[str, str | int | bool] | None = None,
    carrier: Mapping[str, str] | None = None,
) -> Iterator[Span | None]:
    """A current span named ``name`` (``None`` when tracing is off).

    Args:
        kind: the span kind.
        attributes: set when the span starts.
        carrier: trace-context headers to continue (a message's); default: the current
            span, or else the request context's ``traceparent`` (an HTTP layer that only
            copies the header into :func:`~qx.core.request_context` still gets one trace).

    An exception leaving the block is recorded on the span, which is marked as an error.
    """
    tracer = active_tracer()
    if tracer is None:
        yield None
        return
    if carrier is None and not _trace.get_current_span().get_span_context().is_valid:
        traceparent = current_context().traceparent
        if traceparent is not None:
            carrier = {"traceparent": traceparent}
    context = _propagate.extract(carrier) if carrier is not None else None
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=_KINDS[kind],
        attributes=dict(attributes) if attributes else None,
    ) as current:
        yield current


def add_event(name: str, attributes: Mapping[str, str | int | bool]) -> None:
    """Add an event to the current span (nothing when tracing is off)."""
    if active_tracer() is not None:
        _trace.get_current_span().add_event(name, dict(attributes))


def trace_headers(fallback: str | None = None) -> dict[str, str]:
    """The current trace context as headers (``traceparent``, ``tracestate``, ...), to store
    with an outbox row; ``{"traceparent": fallback}`` when tracing is off or no span is
    current (a ``traceparent`` the request context carried), else ``{}``."""
    if active_tracer() is not None and _trace.get_current_span().get_span_context().is_valid:
        carrier: dict[str, str] = {}
        _propagate.inject(carrier)
        if carrier:
            return carrier
    return {"traceparent": fallback} if fallback is not None else {}


if _trace is not None:
    _KINDS = {
        "internal": _trace.SpanKind.INTERNAL,
        "producer": _trace.SpanKind.PRODUCER,
        "consumer": _trace.SpanKind.CONSUMER,
    }
