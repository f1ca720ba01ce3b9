"""Testing kit: in-memory repositories and units of work, and pytest fixtures.

The pytest plugin (``qx.testing.plugin``) is registered by installing qx; its fixtures are
``qx_engine``, ``qx_session`` (one SAVEPOINT per test, rolled back) and ``uow_factory``.
"""

from qx.outbox.publishers import MemoryPublisher
from qx.testing._memory import (
    InMemoryQuery,
    InMemoryRepository,
    InMemoryStore,
    InMemoryUnitOfWork,
    InMemoryUnitOfWorkFactory,
)

__all__ = [
    "InMemoryQuery",
    "InMemoryRepository",
    "InMemoryStore",
    "InMemoryUnitOfWork",
    "InMemoryUnitOfWorkFactory",
    "MemoryPublisher",
]
