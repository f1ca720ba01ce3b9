"""The identity map of qx's sessions: SQLAlchemy's weak map that also holds, for the
transaction, every aggregate root a query loads.

SQLAlchemy's identity map holds unmodified objects weakly. An aggregate root can lose
something without being modified as SQLAlchemy sees it - the events it recorded - so the
transaction must hold each root it loads until it ends. The map is where every loaded row
arrives (``_add_unpresent``, which SQLAlchemy's loading calls once per new object); holding
the root there costs a few attribute lookups per row, where a ``load`` event listener cost
about a sixth of the row's hydration (SQLAlchemy's event dispatch per row: 4.5K of 38K
instructions per row reading 300 rows). The hold ends when the session lets go of its objects
(``QxSession.expunge_all``, the first step of ``close()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import InstanceState
from sqlalchemy.orm import identity as _sa_identity
from sqlalchemy.orm.base import manager_of_class

from qx.db._model import holds_loaded
from qx.db._transaction import TransactionView

__all__ = ["HoldingIdentityMap"]

if TYPE_CHECKING:
    from sqlalchemy.orm.identity import _WeakInstanceDict as _WeakMap
else:  # SQLAlchemy 2.1 renamed it (2.0: WeakInstanceDict); the class is the same
    _WeakMap = getattr(_sa_identity, "_WeakInstanceDict", None) or _sa_identity.WeakInstanceDict


class HoldingIdentityMap(_WeakMap):
    """A session's identity map that holds each loaded aggregate root in ``transaction``.

    Args:
        transaction: the session's transaction record; its ``roots`` (the same dict for the
            record's life) receive the roots.
        after: the map this one replaces in the same session, whose knowledge of which
            classes are held it takes over.
    """

    def __init__(
        self, transaction: TransactionView, *, after: HoldingIdentityMap | None = None
    ) -> None:
        super().__init__()
        self._roots = transaction.roots
        self._held: _HeldByClass = _HeldByClass() if after is None else after._held

    def _add_unpresent(self, state: InstanceState[Any], key: Any) -> None:
        # SQLAlchemy's own body (the object is new to the map), then the hold.
        self._dict[key] = state
        state._instance_dict = self._wr
        if self._held[state.class_]:
            self._roots[state] = state.obj()


class _HeldByClass(dict[type[Any], bool]):
    """Whether a transaction holds the loaded instances of each mapped class, learned at the
    class's first row (a plain subscript per row: no method call)."""

    def __missing__(self, cls: type[Any]) -> bool:
        held = self[cls] = holds_loaded(manager_of_class(cls).mapper)
        return held
