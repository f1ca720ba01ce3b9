"""qx: persistence for async clean-architecture Python services.

The names most services import; everything else lives in :mod:`qx.core`, :mod:`qx.db` and
:mod:`qx.outbox`.
"""

from qx.core import (
    AggregateRoot,
    CommitOutcomeUnknown,
    ConcurrencyConflict,
    ConfigurationError,
    Conflict,
    DomainEvent,
    DuplicateKey,
    Event,
    EventDispatcher,
    InProcessDispatcher,
    IntegrationEvent,
    IntegrityViolation,
    InvalidCursor,
    InvalidQuery,
    NotFound,
    QxError,
    RequestContext,
    TenantRequired,
    TenantViolation,
    TransientError,
    UnitOfWorkError,
    current_context,
    new_id,
    request_context,
    system_context,
)
from qx.db import (
    Page,
    Q,
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_engine,
    create_session_factory,
)
from qx.settings import QxSettings, load_settings

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
