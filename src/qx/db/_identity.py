"""The identity map of qx's sessions: SQLAlchemy's weak map that also holds, for the
transaction, every aggregate root a query loads.

SQLAlchemy's identity map holds unmodified objects weakly. An aggregate root can lose
something without being modified as SQLAlchemy sees it - the events it recorded - so the
transaction must hold each root it loads until it ends. The map is where every loaded row
arrives (``_add_unpresent``, which SQLAlchemy's loading calls once per new object); holding
the root there costs a few attribute lookups per row, where a ``load`` event listener cost
about a sixth of the row's hydration (SQLAlchemy's event dispatch per row: 4.5K of 38K
instructions per row reading 300 rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import InstanceState
from sqlalchemy.orm import identity as _sa_identity

from qx.db._model import MODEL_KEY, holds_loaded
from qx.db._transaction import TransactionView

__all__ = ["HoldingIdentityMap"]

if TYPE_CHECKING:
    from sqlalchemy.orm.identity import _WeakInstanceDict as _WeakMap
else:  # SQLAlchemy 2.1 renamed it (2.0: WeakInstanceDict); the class is the same
    _WeakMap = getattr(_sa_identity, "_WeakInstanceDict", None) or _sa_identity.WeakInstanceDict


class HoldingIdentityMap(_WeakMap):
    """A session's identity map that holds each loaded aggregate root in ``transaction``.

    Args:
        transaction: the session's transaction record; its ``roots`` (replaced when a
            transaction ends) receive the roots.
    """

    def __init__(self, transaction: TransactionView) -> None:
        super().__init__()
        self._transaction = transaction

    def _add_unpresent(self, state: InstanceState[Any], key: Any) -> None:
        # SQLAlchemy's own body (the object is new to the map), then the hold.
        self._dict[key] = state
        state._instance_dict = self._wr
        model = state.manager.info.get(MODEL_KEY)
        held = None if model is None else model.held
        if held is None:
            held = holds_loaded(state.mapper)
        if held:
            root = state.obj()
            self._transaction.roots[id(root)] = root
