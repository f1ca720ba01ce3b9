"""Testing kit: qx's own units of work on a private in-memory database, and pytest fixtures.

The pytest plugin (``qx.testing.plugin``) is registered by installing qx; its fixtures are
``qx_engine``, ``qx_session`` (one SAVEPOINT per test, rolled back) and ``uow_factory``.
"""

from qx.outbox.publishers._inprocess import MemoryPublisher
from qx.testing._memory import InMemoryStore, InMemoryUnitOfWorkFactory

__all__ = ["InMemoryStore", "InMemoryUnitOfWorkFactory", "MemoryPublisher"]
