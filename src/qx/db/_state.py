"""The lifecycle states of a unit of work (a module of its own: the bus needs only this)."""

from __future__ import annotations

import enum

__all__ = ["UnitOfWorkState"]


class UnitOfWorkState(enum.Enum):
    """Lifecycle: NEW → ACTIVE → COMMITTED | ROLLED_BACK → CLOSED."""

    NEW = "new"
    ACTIVE = "active"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"
    CLOSED = "closed"
