"""qx: persistence for async clean-architecture Python services.

The names most services import; everything else lives in :mod:`qx.core`, :mod:`qx.errors`,
:mod:`qx.db` and :mod:`qx.outbox`.
"""

from typing import TYPE_CHECKING, Any

from qx.core import (
    AggregateRoot,
    DomainEvent,
    Event,
    EventDispatcher,
    InProcessDispatcher,
    IntegrationEvent,
    RequestContext,
    current_context,
    new_id,
    request_context,
    system_context,
)
from qx.errors import (
    CommitOutcomeUnknown,
    ConcurrencyConflict,
    ConfigurationError,
    Conflict,
    DuplicateKey,
    IntegrityViolation,
    InvalidCursor,
    InvalidQuery,
    NotFound,
    QxError,
    TenantRequired,
    TenantViolation,
    TransientError,
    UnitOfWorkError,
)

if TYPE_CHECKING:
    from qx.db import (
        Repository,
        UnitOfWork,
        UnitOfWorkFactory,
        create_engine,
        create_session_factory,
    )
    from qx.db.query import Page, Q
    from qx.settings import QxSettings, load_settings

# The database and settings layers load on first use: a domain module's
# `from qx import AggregateRoot` (or `qx.core`) imports no SQLAlchemy and no pydantic.
_LAZY: dict[str, str] = {
    "Page": "qx.db.query",
    "Q": "qx.db.query",
    "Repository": "qx.db",
    "UnitOfWork": "qx.db",
    "UnitOfWorkFactory": "qx.db",
    "create_engine": "qx.db",
    "create_session_factory": "qx.db",
    "QxSettings": "qx.settings",
    "load_settings": "qx.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AggregateRoot",
    "CommitOutcomeUnknown",
    "ConcurrencyConflict",
    "ConfigurationError",
    "Conflict",
    "DomainEvent",
    "DuplicateKey",
    "Event",
    "EventDispatcher",
    "InProcessDispatcher",
    "IntegrationEvent",
    "IntegrityViolation",
    "InvalidCursor",
    "InvalidQuery",
    "NotFound",
    "Page",
    "Q",
    "QxError",
    "QxSettings",
    "Repository",
    "RequestContext",
    "TenantRequired",
    "TenantViolation",
    "TransientError",
    "UnitOfWork",
    "UnitOfWorkError",
    "UnitOfWorkFactory",
    "__version__",
    "create_engine",
    "create_session_factory",
    "current_context",
    "load_settings",
    "new_id",
    "request_context",
    "system_context",
]
