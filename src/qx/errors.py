"""The qx error tree (re-exported from :mod:`qx.core.errors`)."""

from qx.core.errors import (
    ConcurrencyConflict,
    ConfigurationError,
    Conflict,
    DatabaseError,
    DuplicateKey,
    IntegrityViolation,
    InvalidCursor,
    InvalidQuery,
    NotFound,
    PublishError,
    QxError,
    StatementTimeout,
    TenantRequired,
    TenantViolation,
    TransientError,
    UnitOfWorkError,
)

__all__ = [
    "ConcurrencyConflict",
    "ConfigurationError",
    "Conflict",
    "DatabaseError",
    "DuplicateKey",
    "IntegrityViolation",
    "InvalidCursor",
    "InvalidQuery",
    "NotFound",
    "PublishError",
    "QxError",
    "StatementTimeout",
    "TenantRequired",
    "TenantViolation",
    "TransientError",
    "UnitOfWorkError",
]
