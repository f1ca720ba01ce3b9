"""Where a session keeps qx's record of its transaction, for the modules below the tracking.

The record itself, :class:`qx.db._tracking.TransactionState`, walks aggregates and so needs
the mapping; the mapping's load hook, the statement scoping and the error translation only
need to find the record of a session and use a few of its members. They find it here, by the
:class:`TransactionView` it offers them, so none of them imports the tracking (which imports
the mapping back).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from sqlalchemy import event
from sqlalchemy.orm import InstanceState, Mapper

__all__ = ["TX_KEY", "RowsChecked", "TransactionView", "existing_transaction", "watch_keys"]

# Key of the record in ``Session.info``, SQLAlchemy's per-session dict for extensions: the
# session hooks receive only the session, so that is where they find it.
TX_KEY: Final = "qx.transaction"


class RowsChecked:
    """Set on the transaction while ``Repository.get`` loads one row by primary key, or
    while a query whose statement scopes its root rows with a plain WHERE runs
    (``ScopedStatement`` with ``rows_of``).

    With ``root_pending``, the first ORM statement the session then executes (get's
    primary-key load) runs without criteria; get() checks its row with ``visible``.
    Relationship loads executed meanwhile get their WHERE from ``loader_where``. Any other
    statement (one a flush listener runs, say) is scoped as usual.
    """

    __slots__ = ("root_pending", "with_deleted")

    def __init__(self, *, with_deleted: bool, root_pending: bool = True) -> None:
        self.with_deleted = with_deleted
        self.root_pending = root_pending


class TransactionView(Protocol):
    """What the modules below the tracking use of a transaction's record."""

    rows_checked: RowsChecked | None
    connected: bool
    flushed: bool
    #: the roots held until the transaction ends, by instance state (one dict, emptied when
    #: a transaction ends)
    roots: dict[InstanceState[Any], Any]
    transaction_id: str | None
    keys_changed: bool
    #: qx's INSERTs not sent yet, in order: ``(WriteStatement, rows)`` (see ``qx.db._writes``)
    pending: list[tuple[Any, list[dict[str, Any]]]]

    def track(self, root: Any) -> None:
        """Hold ``root`` until the transaction ends."""

    def stale(self) -> tuple[str, ...]:
        """``Type(id)`` of the roots the last flush version-checked."""


def existing_transaction(session: Any) -> TransactionView | None:
    """The record of a (sync) session's transaction, or ``None`` for a session qx did not
    make or that has not started one."""
    found: TransactionView | None = session.info.get(TX_KEY)
    return found


def watch_keys(mapper: Mapper[Any]) -> None:
    """Have a change to the primary key of ``mapper``'s loaded rows noted on the
    transaction of their session (``keys_changed``), once per mapper.

    A load by primary key skips the autoflush unless it could read a pending change
    (``qx.db._session.key_load_sees_pending``), and a loaded row whose key was changed is
    one. Noting it when it happens costs nothing until then; finding it at each load meant
    walking every changed row of the session, per load: quadratic in a loop of ``require()``
    and a change (two fifths of the client's instructions over 300 rows).
    """
    # On the hierarchy's base attributes, once: propagated to every subclass, so a key
    # set on a subclass instance is noted once whichever class's model came first.
    base = mapper.base_mapper
    for column in base.primary_key:
        attribute = base.class_manager[base.get_property_by_column(column).key]
        if not event.contains(attribute, "set", _key_set):
            event.listen(attribute, "set", _key_set, raw=True, propagate=True)


def _key_set(state: InstanceState[Any], value: Any, _old: Any, _initiator: Any) -> None:
    if state.key is None:
        return  # a new object's key: a load can only find it through the session's new
    session = state.session
    record = None if session is None else existing_transaction(session)
    if record is not None:
        record.keys_changed = True
