"""Request context: correlation, causation, tenant and user ids carried in a ContextVar.

The unit of work stamps these ids onto every outbox row, and tenant-scoped repositories read
the tenant from here (failing closed when there is none).

Example:
    >>> from qx.core._context import current_context, request_context
    >>> with request_context(tenant_id="acme", correlation_id="req-1"):
    ...     current_context().tenant_id
    'acme'
    >>> current_context().tenant_id is None
    True
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from qx.core._errors import ConfigurationError

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
        consistency_token: a commit the client has seen (``uow.consistency_token``, sent
            back by the client): read-only units of work read no older state than it.
        system: ``True`` inside :func:`system_context`: tenant scoping is bypassed.
    """

    correlation_id: str | None = None
    causation_id: str | None = None
    tenant_id: str | None = None
    user_id: str | None = None
    traceparent: str | None = None
    consistency_token: str | None = None
    system: bool = False


_EMPTY = RequestContext()
_current: ContextVar[RequestContext] = ContextVar("qx_request_context", default=_EMPTY)


def current_context() -> RequestContext:
    """Return the request context of the running task (an empty one by default)."""
    return _current.get()


class _ContextBlock:
    """The ``with`` block of :func:`request_context` / :func:`system_context`.

    A plain class rather than ``@contextmanager``: every unit of work of a request runs
    inside one, and a generator-based manager costs a generator and two resumptions.
    """

    __slots__ = ("_changes", "_token")

    def __init__(self, changes: tuple[str | bool | None, ...]) -> None:
        self._changes = changes  # one value per RequestContext field, None = keep
        self._token: Token[RequestContext] | None = None

    def __enter__(self) -> RequestContext:
        if self._token is not None:
            raise ConfigurationError("a request_context block cannot be entered twice at once")
        ctx = _layered(_current.get(), self._changes)
        self._token = _current.set(ctx)
        return ctx

    def __exit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)


@lru_cache(maxsize=1024)
def _layered(base: RequestContext, changes: tuple[str | bool | None, ...]) -> RequestContext:
    # Contexts are immutable values, and a service sees the same few (tenant, user) pairs
    # again and again: building each once keeps the per-request cost to a dict lookup.
    correlation_id, causation_id, tenant_id, user_id, traceparent, token, system = changes
    return RequestContext(
        correlation_id=base.correlation_id if correlation_id is None else str(correlation_id),
        causation_id=base.causation_id if causation_id is None else str(causation_id),
        tenant_id=base.tenant_id if tenant_id is None else str(tenant_id),
        user_id=base.user_id if user_id is None else str(user_id),
        traceparent=base.traceparent if traceparent is None else str(traceparent),
        consistency_token=base.consistency_token if token is None else str(token),
        system=base.system if system is None else bool(system),
    )


def request_context(
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    tenant_id: str | None = None,
    user_id: str | None = None,
    traceparent: str | None = None,
    consistency_token: str | None = None,
) -> AbstractContextManager[RequestContext]:
    """Run a block with the given ids layered over the current context.

    Arguments left as ``None`` keep the value of the enclosing context, so nested blocks can
    refine one id without repeating the others.

    Raises:
        ConfigurationError: an id is given but is not a non-empty string.

    Example:
        >>> with request_context(tenant_id="t1"):
        ...     with request_context(user_id="u1") as ctx:
        ...         (ctx.tenant_id, ctx.user_id)
        ('t1', 'u1')
    """
    changes = (correlation_id, causation_id, tenant_id, user_id, traceparent, consistency_token)
    for key, value in zip(_ID_FIELDS, changes, strict=True):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(
                f"request_context {key} must be a non-empty str, got {value!r}"
            )
    return _ContextBlock((*changes, None))


_ID_FIELDS: Final = (
    "correlation_id",
    "causation_id",
    "tenant_id",
    "user_id",
    "traceparent",
    "consistency_token",
)
_SYSTEM: Final = (None, None, None, None, None, None, True)


def system_context() -> AbstractContextManager[RequestContext]:
    """Run a block as the system: tenant scoping is bypassed, explicitly.

    Use it for operators' jobs (migrations, relays, admin scripts), never for a request.

    Example:
        >>> with system_context() as ctx:
        ...     ctx.system
        True
    """
    return _ContextBlock(_SYSTEM)
