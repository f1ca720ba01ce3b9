"""What one transaction knows about the aggregates it has seen.

SQLAlchemy's identity map holds unmodified objects weakly, and autoflush moves changes out of
``session.dirty``. So nothing qx must remember about an aggregate - its recorded events, that
its version was bumped, that a part changed - may depend on the identity map or on who keeps
a reference. :class:`TransactionState` is the unit of work's own record (cosmicpython's
``seen``): every aggregate root added to, loaded by or deleted through the session, by any
path, is held strongly until the transaction ends, and events are collected from it.

The one exception is :meth:`TransactionState.release`, which ``Query.stream`` uses to keep
memory flat: it lets go of a root only when nothing about it can be lost - no unflushed
change, no pending event - and keeps what it needs to hold it again the moment that stops
being true, without a reference that would keep it alive: the list the root records its
events into (an event recorded there holds its aggregate, so a root that records one lives
until events are collected, whoever drops it) and, for each of its parts, the root's identity
and version (a changed part brings its root back, reloaded if nobody kept it; see
:class:`RootLink`). Nothing is written into the domain objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, NamedTuple
from weakref import WeakKeyDictionary, ref

from sqlalchemy.orm import InstanceState
from sqlalchemy.orm.attributes import flag_modified, instance_state

from qx.core._aggregate import AggregateRoot, RecordedEvent, recorded
from qx.core._clock import Clock, SystemClock
from qx.db._mapping import entity_info
from qx.db._model import EntityInfo
from qx.db._transaction import TX_KEY, RowsChecked

__all__ = [
    "RootLink",
    "TransactionState",
    "members",
    "owned_parts",
    "renew_transient",
    "touched",
    "transaction_of",
]


class RootLink(NamedTuple):
    """Where a released root's part belongs: the root's identity key and the version the
    transaction saw, so a changed part can bring back (or reload) its root and a reload can
    tell whether someone else changed the root meanwhile.

    Plain values, not the root: a link must not keep a released root alive (the identity map
    holds every part's state strongly, so an object here would keep each released root for
    the session's life and a stream's memory would grow).
    """

    key: Any
    version: Any


def members(value: Any) -> Iterator[Any]:
    """The objects a relationship's value holds: one object, or the items of a list or set,
    or the values of a dict-keyed collection (``attribute_keyed_dict``), never its keys."""
    if value is None:
        return
    if isinstance(value, Mapping):
        yield from value.values()
    elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
        yield from value
    else:
        yield value


def owned_parts(state: InstanceState[Any], info: EntityInfo) -> Iterator[Any]:
    """Yield the loaded parts directly owned by ``state``'s object (unloaded ones never
    changed)."""
    for key in info.owned:
        yield from members(state.dict.get(key))


def touched(state: InstanceState[Any]) -> bool:
    """Whether an aggregate (root or part) holds anything not yet flushed or collected:
    changed columns or collections, new or deleted parts, pending events."""
    if state.modified or state.key is None or state.deleted:
        return True
    obj = state.obj()
    if isinstance(obj, AggregateRoot) and obj.has_pending_events():
        return True
    return any(
        touched(instance_state(part)) for part in owned_parts(state, entity_info(state.mapper))
    )


_SYSTEM_CLOCK: Final = SystemClock()


class TransactionState:
    """One session's transaction as qx's hooks, repositories and queries see it: the
    aggregates it has seen, the version bumps it made, its clock.

    Made with the session (its unit of work sets the clock) and found through
    :func:`transaction_of`; cleared when an outermost transaction ends, so nothing leaks
    into the next.

    Attributes:
        clock: the clock of audit columns and soft deletes.
        rows_checked: set while ``Repository.get`` reads one row it checks itself.
        roots: every aggregate root seen, held strongly, in the order first seen, by its
            instance state (by identity: never the application's ``__eq__``). The same dict
            for the record's life - emptied when a transaction ends - so the identity map
            fills it without going through the record.
        bumped: identity keys (persistent roots) and states (roots inserted in this
            transaction) whose version needs no further bump until the transaction ends.
        checked: ``(info, state)`` of the roots whose version the last flush checked, to
            name them if the check fails.
        flushed: whether the transaction has written anything.
        connected: whether it has taken a connection (run any statement).
        transaction_id: the database's id of the transaction, once a write brought it back
            (``None``: not known yet; see ``qx.db._writes``).
        keys_changed: a row of the session had its primary key changed in this transaction
            (see ``qx.db._transaction.watch_keys``).
        read_only: the unit of work refuses writes (kept across transactions, like the
            clock).
        released: for each root let go of by :meth:`release` and still alive, the list it
            records events into (the root itself weakly, to forget it when it goes).
        links: for each part of a released root (its state, weakly), its :class:`RootLink`.
        pending: qx's INSERTs held back to go with the transaction's next write or with
            COMMIT, in order (``qx.db._writes.defer_write``).
        unattached: new objects a repository added, by ``id()``, not given to the session
            yet: the commit writes them without the session's per-object bookkeeping
            (``qx.db._insert_new``), and anything else the session does first takes them
            in (``QxSession.take_in_new``), as if they had been added to it.
    """

    __slots__ = (
        "bumped",
        "checked",
        "clock",
        "connected",
        "flushed",
        "keys_changed",
        "links",
        "pending",
        "read_only",
        "released",
        "roots",
        "rows_checked",
        "transaction_id",
        "unattached",
    )

    def __init__(self, clock: Clock = _SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.rows_checked: RowsChecked | None = None
        self.roots: dict[InstanceState[Any], Any] = {}
        self.bumped: set[Any] = set()
        self.checked: list[tuple[EntityInfo, InstanceState[Any]]] = []
        self.flushed = False
        self.connected = False
        self.read_only = False
        self.transaction_id: str | None = None
        self.keys_changed = False
        self.pending: list[tuple[Any, list[dict[str, Any]]]] = []
        self.unattached: dict[int, Any] = {}
        # Made by the first release: most transactions never stream.
        self.released: dict[int, tuple[ref[Any], list[RecordedEvent]]] | None = None
        self.links: WeakKeyDictionary[InstanceState[Any], RootLink] | None = None

    def reset(self) -> None:
        """Forget the transaction that ended (the clock stays)."""
        self.rows_checked = None
        self.roots.clear()
        self.bumped = set()
        self.checked = []
        self.flushed = False
        self.connected = False
        self.transaction_id = None
        self.keys_changed = False
        self.pending = []
        self.unattached = {}
        self.released = None
        self.links = None

    def track(self, root: Any) -> None:
        """Hold ``root`` until the transaction ends."""
        self.roots[instance_state(root)] = root

    def add_new(self, obj: Any, *, root: bool) -> None:
        """Note a new object a repository added (see ``unattached``); a root is held until
        the transaction ends, as if the session had taken it in."""
        self.unattached[id(obj)] = obj
        if root:
            self.roots[instance_state(obj)] = obj

    def let_go(self) -> None:
        """Stop holding the roots the session held: it let go of its objects
        (``expunge_all``). The new roots a repository added and the session has not taken in
        yet stay held - they are the unit of work's own, written at commit with their
        events."""
        self.roots.clear()
        for obj in self.unattached.values():  # empty after a commit: nothing to do at close
            state = instance_state(obj)
            if entity_info(state.mapper).is_root:
                self.roots[state] = obj

    def has_bumped(self, state: InstanceState[Any]) -> bool:
        """Whether the root of ``state`` was versioned (bumped or inserted) already."""
        return state in self.bumped or (state.key is not None and state.key in self.bumped)

    def mark_bumped(self, state: InstanceState[Any]) -> None:
        """Note that the root of ``state`` needs no further bump in this transaction."""
        self.bumped.add(state.key if state.key is not None else state)

    def release(self, roots: Iterable[Any]) -> None:
        """Stop holding each of ``roots`` that has nothing left to lose.

        A released root is held again as soon as it could lose something: when events are
        collected, if it recorded one (:meth:`take_back`); at the next flush, if one of its
        parts changed (:meth:`link_of`). A caller who kept a reference uses it normally.
        """
        released = self.released
        links = self.links
        if released is None or links is None:
            released = self.released = {}
            links = self.links = WeakKeyDictionary()
        for root in roots:
            state = instance_state(root)
            if touched(state):
                continue
            if state in self.bumped and state.key is not None:
                self.bumped.add(state.key)  # a reload of the same row is the same aggregate
            self.roots.pop(state, None)
            if isinstance(root, AggregateRoot):
                key = id(root)
                # The weak reference's callback forgets a root that died with nothing
                # recorded (one that recorded an event is kept alive by the event's record).
                released[key] = (ref(root, _forgetting(released, key)), recorded(root))
            info = entity_info(state.mapper)
            version = None if info.version_key is None else state.dict.get(info.version_key)
            link = RootLink(state.key, version)
            for part_state in _part_states(state, info):
                links[part_state] = link

    def take_back(self) -> None:
        """Hold again every released root that recorded an event since it was released."""
        if self.released:
            for key, (_, pending) in list(self.released.items()):
                if pending:
                    del self.released[key]
                    self.track(pending[0].aggregate)

    def link_of(self, state: InstanceState[Any]) -> RootLink | None:
        """The :class:`RootLink` of a released root's part, or ``None``."""
        return None if self.links is None else self.links.get(state)

    def stale(self) -> tuple[str, ...]:
        """``Type(id)`` of the roots the last flush version-checked (for error messages)."""
        # From identity keys: after a failed flush the objects are expired, and reading
        # their attributes would try to load them again.
        return tuple(
            f"{info.name}({':'.join(str(v) for v in state.identity or ())})"
            for info, state in self.checked
        )


def transaction_of(session: Any) -> TransactionState:
    """The :class:`TransactionState` of a (sync) session, made on first use."""
    info = session.info
    tx: TransactionState | None = info.get(TX_KEY)
    if tx is None:
        tx = info[TX_KEY] = TransactionState()
    return tx


def _forgetting(released: dict[int, Any], key: int) -> Callable[[Any], None]:
    def forget(_: Any) -> None:
        released.pop(key, None)

    return forget


def _part_states(state: InstanceState[Any], info: EntityInfo) -> Iterator[InstanceState[Any]]:
    for part in owned_parts(state, info):
        part_state = instance_state(part)
        yield part_state
        yield from _part_states(part_state, entity_info(part_state.mapper))


def renew_transient(objects: Iterable[Any]) -> None:
    """Make new objects that a rolled-back transaction had written look new again.

    A rollback makes them transient, but their relationships still remember what the failed
    flush wrote: added to a new unit of work, a many-to-many collection would then insert no
    association rows. Marking every loaded relationship of every transient object reachable
    from ``objects`` as changed makes the next flush write all of it, as for a new object.
    """
    seen: set[int] = set()
    stack = list(objects)
    while stack:
        obj = stack.pop()
        state = instance_state(obj)
        if id(obj) in seen or state.key is not None or state.session_id is not None:
            continue  # stored, or still in a session: not a rolled-back new object
        seen.add(id(obj))
        for rel in state.mapper.relationships:
            if rel.key not in state.dict:
                continue
            value = state.dict[rel.key]
            flag_modified(obj, rel.key)
            if value is not None:
                stack.extend(value if rel.uselist else (value,))
