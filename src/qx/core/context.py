"""Request context: correlation, causation, tenant and user ids carried in a ContextVar.

The unit of work stamps these ids onto every outbox row, and tenant-scoped repositories read
the tenant from here (failing closed when there is none).

Example:
    >>> from qx.core.context import current_context, request_context
    >>> with request_context(tenant_id="acme", correlation_id="req-1"):
    ...     current_context().tenant_id
    'acme'
    >>> current_context().tenant_id is None
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

from qx.core.errors import ConfigurationError

__all__ = ["RequestContext", "current_context", "request_context", "system_context"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestContext:
    """Who is acting and why, for the current task.

    Attributes:
        correlation_id: id shared by every message of one business flow.
        causation_id: id of the message that caused the current work.
        tenant_id: the tenant whose data may be read and written.
        user_id: the acting user, if any.
        traceparent: W3C trace context header, propagated to outbox rows.
        system: ``True`` inside :func:`system_context`: tenant scoping is bypassed.
    """

    correlation_id: str | None = None
    causation_id: str | None = None
    tenant_id: str | None = None
    user_id: str | None = None
    traceparent: str | None = None
    system: bool = False


_EMPTY = RequestContext()
_current: ContextVar[RequestContext] = ContextVar("qx_request_context", default=_EMPTY)


def current_context() -> RequestContext:
    """Return the request context of the running task (an empty one by default)."""
    return _current.get()


@contextmanager
def request_context(
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    tenant_id: str | None = None,
    user_id: str | None = None,
    traceparent: str | None = None,
) -> Iterator[RequestContext]:
    """Run a block with the given ids layered over the current context.

    Arguments left as ``None`` keep the value of the enclosing context, so nested blocks can
    refine one id without repeating the others.

    Example:
        >>> with request_context(tenant_id="t1"):
        ...     with request_context(user_id="u1") as ctx:
        ...         (ctx.tenant_id, ctx.user_id)
        ('t1', 'u1')
    """
    base = _current.get()
    changes = {
        key: value
        for key, value in (
            ("correlation_id", correlation_id),
            ("causation_id", causation_id),
            ("tenant_id", tenant_id),
            ("user_id", user_id),
            ("traceparent", traceparent),
        )
        if value is not None
    }
    for key, value in changes.items():
        if not isinstance(value, str) or not value:
            raise ConfigurationError(
                f"request_context {key} must be a non-empty str, got {value!r}"
            )
    ctx = replace(base, **changes) if changes else base  # type: ignore[arg-type]
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


@contextmanager
def system_context() -> Iterator[RequestContext]:
    """Run a block as the system: tenant scoping is bypassed, explicitly.

    Use it for operators' jobs (migrations, relays, admin scripts), never for a request.

    Example:
        >>> with system_context() as ctx:
        ...     ctx.system
        True
    """
    token = _current.set(replace(_current.get(), system=True))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
