"""The session class qx's units of work use, and the hooks that enforce qx's rules.

* ``execute`` / ``scalar`` / ``scalars``: tenant and soft-delete criteria on every ORM
  statement, SQLAlchemy's own loads included (:func:`qx.db._scoping.scope_statement`).
* ``execute`` / ``scalar`` / ``scalars`` / ``flush`` / ``commit``: driver and ORM errors
  leave as qx errors (:mod:`qx.db._translate`), whoever runs the statement - a repository, a
  query, an event handler using ``uow.session`` directly, or an autoflush.
* the transaction's own record of every aggregate root it has seen, held strongly until it
  ends, and its clock (:class:`qx.db._tracking.TransactionState`, in ``Session.info``).
* ``before_flush``: tenant stamping and cross-tenant write refusal, audit timestamps, and the
  aggregate version bump: any change inside an aggregate (its own columns and collections,
  its parts' columns and collections, new or deleted parts) bumps the root's version once per
  transaction, so the root's ``UPDATE … WHERE version = :loaded`` detects every concurrent
  change to the aggregate. qx writes that UPDATE itself where the flush would add nothing to
  it (:mod:`qx.db._updates`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from itertools import chain
from typing import Any, Final, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstanceState, Mapper, PassiveFlag, Session, UOWTransaction
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.attributes import instance_state

from qx.core._clock import SystemClock
from qx.core._context import RequestContext, current_context
from qx.core._errors import ConcurrencyConflict, TenantViolation, UnitOfWorkError
from qx.db._dialect import dialect_of
from qx.db._identity import HoldingIdentityMap
from qx.db._mapping import entity_info
from qx.db._model import EntityInfo, model_of
from qx.db._scoping import scope_statement, tenant_for_write
from qx.db._tracking import (
    TransactionState,
    members,
    owned_parts,
    transaction_of,
)
from qx.db._transaction import existing_transaction
from qx.db._translate import raise_translated
from qx.db._updates import PlannedUpdate, planned_update, write_updates

__all__ = [
    "LoadingByKey",
    "QxSession",
    "has_writes",
    "in_aggregate",
    "key_load_sees_pending",
    "refuse_writes",
    "stamp_new",
]

_SYSTEM_CLOCK: Final = SystemClock()
_NO_LOAD: Final = PassiveFlag.PASSIVE_NO_INITIALIZE


F = TypeVar("F", bound=Callable[..., Any])


def _translated(method: F) -> F:
    """Have a session method raise qx errors for the driver and ORM errors it meets."""

    @functools.wraps(method)
    def run(self: QxSession, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            raise_translated(exc, transaction_of(self).stale)
            raise

    return run  # type: ignore[return-value]


class QxSession(Session):
    """A SQLAlchemy ``Session`` carrying qx's scoping, tracking and versioning hooks.

    Statements are scoped in ``execute``, ``scalar`` and ``scalars`` - the methods every
    statement passes through, SQLAlchemy's own primary-key, relationship and refresh loads
    included - rather than in a ``do_orm_execute`` listener: with any such listener,
    SQLAlchemy prepares every ORM statement twice, which cost a primary-key load of an order
    with its lines about 5% of its CPU time. Users' own ``do_orm_execute`` listeners still
    run, and see the scoped statement.

    What qx tracks per transaction is not on the session: it is the session's
    :class:`~qx.db._tracking.TransactionState` (:func:`~qx.db._tracking.transaction_of`),
    which the session's identity map fills with the aggregate roots it loads
    (:class:`~qx.db._identity.HoldingIdentityMap`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.identity_map = HoldingIdentityMap(transaction_of(self))

    def expunge_all(self) -> None:
        """``Session.expunge_all`` (also the first step of ``close()``): every object leaves
        the session, and the transaction's hold on the roots it loaded ends with it - a
        root out of the session has no events for this transaction to collect (new roots
        added through a repository stay: see ``TransactionState.let_go``)."""
        retired = self.identity_map
        states = retired.all_states() + list(self._new)
        retired._kill()
        self.identity_map = _new_map(self, retired)
        self._new = {}
        self._deleted = {}
        # SQLAlchemy's expunge_all detaches every state its map holds (10 lines of Python
        # each), and each object dies later; an object dying while its map lives also
        # discards itself from it. Retiring the map first, then dropping the hold, costs an
        # object nobody else holds neither: it dies now, its map gone.
        del retired
        transaction_of(self).let_go()
        _detach(self, states)

    @_translated
    def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        """``Session.execute`` of the statement with qx's scoping applied."""
        scoped = scope_statement(self, statement, kw.get("execution_options"))
        return super().execute(scoped, params, **kw)

    @_translated
    def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        """``Session.scalar`` of the statement with qx's scoping applied."""
        scoped = scope_statement(self, statement, kw.get("execution_options"))
        return super().scalar(scoped, params, **kw)

    @_translated
    def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        """``Session.scalars`` of the statement with qx's scoping applied."""
        scoped = scope_statement(self, statement, kw.get("execution_options"))
        return super().scalars(scoped, params, **kw)

    @_translated
    def flush(self, objects: Any = None) -> None:
        """``Session.flush`` (also the autoflush of every query) of everything, the new
        objects repositories added included; a stale version is ``ConcurrencyConflict``
        naming the roots."""
        self.take_in_new()
        super().flush(objects)

    def take_in_new(self) -> None:
        """Add the new objects repositories added to the session (with their parts, by
        cascade), as ``Session.add`` would have when they were added: before anything but
        the commit's insert path uses them (a flush, a load by key)."""
        record = transaction_of(self)
        if record.unattached:
            held, record.unattached = record.unattached, {}
            self.add_all(list(held.values()))

    @_translated
    def commit(self) -> None:
        """``Session.commit``; errors at COMMIT (deferred constraints) are qx errors too."""
        super().commit()


def key_load_sees_pending(session: Session, mapper: Mapper[Any], keys: Iterable[Any]) -> bool:
    """Whether loading ``mapper``'s rows by these primary keys could read changes not yet
    flushed, so that the load must autoflush first.

    A primary-key load reads only its own rows. Pending changes to other rows cannot alter
    what it reads, so flushing them before it (SQLAlchemy's autoflush) only turns one
    flush at commit into one per load: a loop of ``require()`` and a change paid a flush
    and an UPDATE per row. It can read a pending change only through a row of its keys:
    one this session holds already (loaded, perhaps expired), a new object of the same
    hierarchy whose key is one of them or not known yet (generated by the database), or a
    loaded one whose key was changed (any, in this transaction: rare enough). A part's rows
    load with their root's, and a part can only be pending under a root this session holds.

    Args:
        session: the unit of work's (sync) session.
        mapper: the mapper loaded.
        keys: primary-key values (a tuple per key for a composite key).
    """
    if isinstance(session, QxSession):
        session.take_in_new()
    new = session.new
    if not (new or session.identity_map.check_modified()):
        return False  # nothing pending: the autoflush is a no-op anyway
    base = mapper.base_mapper
    wanted = {key if isinstance(key, tuple) else (key,) for key in keys}
    identity_map = session.identity_map
    for key in wanted:
        if mapper.identity_key_from_primary_key(key) in identity_map:
            return True
    for obj in new:
        state = instance_state(obj)
        if state.mapper.base_mapper is base:
            key = tuple(state.mapper.primary_key_from_instance(obj))
            if key in wanted or None in key:
                return True
    # A loaded row whose key was changed (noted as it happens: qx.db._transaction).
    record = existing_transaction(session)
    return record is None or record.keys_changed


class LoadingByKey:
    """Around a primary-key load of ``keys``: autoflush off unless the load could read a
    pending change (:func:`key_load_sees_pending`); pending changes elsewhere wait for the
    next flush.

    A class, not a ``@contextmanager`` generator: it is entered on every ``get()``, and a
    generator-based manager costs five Python calls where this costs two.
    """

    __slots__ = ("_autoflush", "_session")

    def __init__(self, session: Session, mapper: Mapper[Any], keys: Iterable[Any]) -> None:
        self._session = session
        self._autoflush = autoflush = session.autoflush
        if autoflush and not key_load_sees_pending(session, mapper, keys):
            session.autoflush = False

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        self._session.autoflush = self._autoflush


def has_writes(session: QxSession) -> bool:
    """Return whether the transaction flushed, or holds unflushed changes."""
    # check_modified() reads the identity map's modified set; ``session.dirty`` would diff
    # every loaded object's attributes, which a read-only unit of work pays on every exit.
    record = transaction_of(session)
    return (
        record.flushed
        or bool(record.unattached)
        or session.identity_map.check_modified()
        or bool(session.new or session.deleted)
    )


#: The block of a read that goes in the transaction (nothing to do around it; reusable).
_IN_TRANSACTION: Final = nullcontext()


def read_alone(session: Session, mapper: Mapper[Any]) -> AbstractContextManager[None]:
    """The block in which a read goes: on its own where it is the transaction's first
    statement (PostgreSQL: without BEGIN, so the unit of work that only reads is one round
    trip where BEGIN, the read and the ROLLBACK at its close took three), else in the
    transaction.

    On its own only for the first statement of a transaction with nothing to write (an
    autoflush would send the writes in the block), on a connection that asked for no
    isolation level, READ ONLY or DEFERRABLE (``Dialect.alone``). Under READ COMMITTED, the
    server's default, every statement of a transaction reads a snapshot of its own: one
    that runs before BEGIN reads the same rows. Whatever comes next begins the transaction
    as usual. ``mapper``: the class read, for a session that binds classes to engines.
    """
    if not _first_statement(session):
        return _IN_TRANSACTION
    connection = session.connection(bind_arguments={"mapper": mapper})
    return dialect_of(connection).alone(connection) or _IN_TRANSACTION


async def read_alone_async(
    session: AsyncSession, mapper: Mapper[Any], *, locks: bool = False
) -> AbstractContextManager[None]:
    """:func:`read_alone` for a read sent from the event loop's side of an ``AsyncSession``
    (a query's), with the same rules; a read that ``locks`` its rows goes in the
    transaction its locks last for."""
    if locks or not _first_statement(session.sync_session):
        return _IN_TRANSACTION
    connection = (await session.connection(bind_arguments={"mapper": mapper})).sync_connection
    alone = None if connection is None else dialect_of(connection).alone(connection)
    return alone or _IN_TRANSACTION


def _first_statement(session: Session) -> bool:
    # Nothing ran in the transaction and nothing is to be written before the read.
    record = existing_transaction(session)
    return not (record is None or record.connected or has_writes(session))  # type: ignore[arg-type]


def _net_modified(state: InstanceState[Any]) -> bool:
    # What session.is_modified() answers, looking only at the attributes touched since the
    # last flush (the committed_state keys): is_modified() diffs every attribute. Columns and
    # collections alike - a many-to-many set changed on a part is a change to the aggregate.
    if not state.modified:
        return False
    obj = state.obj()
    for key in list(state.committed_state):
        if orm_attributes.get_history(obj, key, passive=_NO_LOAD).has_changes():
            return True
    return False


def _walk_parts(
    state: InstanceState[Any], info: EntityInfo, changed: set[Any], claimed: set[Any]
) -> bool:
    """Whether a part of the aggregate (at any depth) is among ``changed``; every part
    visited is added to ``claimed``."""
    found = False
    for part in chain(owned_parts(state, info), _removed_parts(state, info)):
        part_state = instance_state(part)
        claimed.add(part_state)
        if part_state in changed:
            found = True
        part_info = entity_info(part_state.mapper)
        if part_info.owned and _walk_parts(part_state, part_info, changed, claimed):
            found = True
    return found


def _removed_parts(state: InstanceState[Any], info: EntityInfo) -> Iterator[Any]:
    # Parts taken out of a collection since the last flush: they are changes of this
    # aggregate too (orphans, deleted at flush), though no longer reachable from it.
    committed = state.committed_state
    if not committed:
        return
    for key in info.owned:
        original = committed.get(key)
        if original is None:
            continue
        # A scalar owned relationship's previous part, or the items of a list, set or
        # dict-keyed collection (its values: the keys are not parts).
        kept = {id(item) for item in members(state.dict.get(key))}
        for item in members(original):
            # committed_state may hold a marker (no previous value) rather than an object.
            if id(item) not in kept and hasattr(item, "_sa_instance_state"):
                yield item


def in_aggregate(mapper: Mapper[Any]) -> bool:
    """Whether ``mapper``'s objects are parts of an aggregate: owned (delete-orphan) by a
    root, or by a part of one (cached per mapper)."""
    model = model_of(mapper)
    found = model.in_aggregate
    if found is None:
        found = False
        seen = {mapper}
        stack = [mapper]
        while stack and not found:
            current = stack.pop()
            for owner in current.registry.mappers:
                for rel in owner.relationships:
                    if not rel.cascade.delete_orphan or not current.isa(rel.mapper):
                        continue
                    if entity_info(owner).is_root:
                        found = True
                    elif owner not in seen:
                        seen.add(owner)
                        stack.append(owner)
        model.in_aggregate = found
    return found


def _check_tenant(
    obj: Any, info: EntityInfo, tenant: str | None, system: bool, *, persistent: bool = True
) -> None:
    if info.tenant_key is None or system:
        return
    value = getattr(obj, info.tenant_key)
    if value != tenant:
        raise TenantViolation(
            f"{info.describe(obj)} belongs to tenant {value!r}, not to the current tenant "
            f"{tenant!r}; cross-tenant writes are refused"
        )
    if not persistent or info.tenant_key not in instance_state(obj).committed_state:
        return  # a new row has no stored tenant to protect; an untouched one kept its own
    history = orm_attributes.get_history(obj, info.tenant_key)
    if history.deleted and history.deleted[0] is not None and history.deleted[0] != value:
        raise TenantViolation(f"{info.describe(obj)}: the tenant of a row cannot be changed")


def stamp_new(
    new: Iterable[Any], session: Session, ctx: RequestContext, now: Any, tx: TransactionState
) -> tuple[set[InstanceState[Any]], bool]:
    """Stamp tenant, audit and version columns of the ``new`` objects (the session's, or
    those the insert path writes); return their states and whether a new part of an
    aggregate is among them."""
    changed: set[InstanceState[Any]] = set()
    child_changed = False
    for obj in new:
        state = instance_state(obj)
        info = entity_info(state.mapper)
        changed.add(state)
        if info.tenant_key is not None:
            tenant = tenant_for_write(info, ctx)
            if getattr(obj, info.tenant_key) is None:
                setattr(obj, info.tenant_key, tenant)
            else:
                _check_tenant(obj, info, tenant, ctx.system, persistent=False)
        if info.created_key is not None and getattr(obj, info.created_key) is None:
            setattr(obj, info.created_key, now)
        if info.updated_key is not None and getattr(obj, info.updated_key) is None:
            setattr(obj, info.updated_key, now)
        if info.is_root:
            tx.mark_bumped(state)  # a new row needs no bump: its INSERT is its own guard
            if info.version_key is not None and getattr(obj, info.version_key) is None:
                setattr(obj, info.version_key, 1)
        else:
            child_changed = child_changed or in_aggregate(state.mapper)
            _hold_linked_root(session, tx, state)
    return changed, child_changed


def _hold_linked_root(session: Session, tx: TransactionState, state: InstanceState[Any]) -> None:
    # A part of a root a stream let go of changed: its root must be held and versioned. If
    # nobody kept the root it is loaded again, at the version the transaction saw, or the
    # change is refused: versioning the row someone else has changed since would hide their
    # change from this one.
    link = tx.link_of(state)
    if link is None:
        return
    root = session.identity_map.get(link.key)
    if root is None:
        cls, ident, token = link.key
        root = session.get(cls, ident, identity_token=token)
        info = entity_info(state.mapper if root is None else instance_state(root).mapper)
        if root is None or (
            info.version_key is not None and getattr(root, info.version_key) != link.version
        ):
            described = f"{entity_info(cls.__mapper__).name}({':'.join(map(str, ident))})"
            raise ConcurrencyConflict(
                f"{described} changed or vanished since this unit of work read it, and a "
                "part of it was changed here: load it again and retry",
                entities=(described,),
            )
    tx.track(root)


def _bump(root: Any, state: InstanceState[Any], info: EntityInfo, now: Any) -> None:
    key = info.version_key
    if key is not None:
        history = orm_attributes.get_history(root, key, passive=_NO_LOAD)
        if history.added and history.deleted:
            # Domain code changed the version itself: write its value, do not bump again.
            # Going backwards would let a writer holding an older copy pass the check.
            old, new = history.deleted[0], history.added[0]
            if not (isinstance(new, int) and isinstance(old, int) and new > old):
                raise UnitOfWorkError(
                    f"{info.describe(root)}.{key} went from {old!r} to {new!r}: a version "
                    "may only grow (qx bumps it itself when the aggregate changes)"
                )
        else:
            setattr(root, key, (getattr(root, key) or 0) + 1)
    if info.updated_key is not None:
        setattr(root, info.updated_key, now)


def refuse_writes(session: Session, tx: TransactionState) -> None:
    """Raise ``UnitOfWorkError`` if a read-only unit of work has anything to write: every
    write path asks here before it sends anything (SQLite has no read-only transactions to
    refuse it)."""
    if tx.read_only and (tx.unattached or session.new or session.deleted or session.dirty):
        raise UnitOfWorkError(
            "a read-only unit of work cannot write (use the factory's read-write units of "
            "work for commands)"
        )


def _new_map(session: Session, before: Any) -> HoldingIdentityMap:
    """The identity map replacing ``before`` in ``session``."""
    after = before if isinstance(before, HoldingIdentityMap) else None
    return HoldingIdentityMap(transaction_of(session), after=after)


def _detach(session: Session, states: list[InstanceState[Any]]) -> None:
    """Detach ``states`` of a retired identity map from ``session``, as
    ``InstanceState._detach_states`` does: those whose object is alive."""
    dispatch = session.dispatch
    if (
        dispatch.persistent_to_detached
        or dispatch.deleted_to_detached
        or dispatch.pending_to_transient
        or dispatch.persistent_to_transient
    ):
        # It tells the listeners (not of objects that died: neither does a plain session).
        InstanceState._detach_states([s for s in states if s.obj() is not None], session)
        return
    # With no listener to tell, detaching is these two attributes of each state - which a
    # dead object's state has set already: its cleanup did the same.
    for state in states:
        state.session_id = state._strong_obj = None


@event.listens_for(QxSession, "before_flush")
def _before_flush(session: QxSession, _flush: UOWTransaction, _instances: Any) -> None:
    tx = transaction_of(session)
    refuse_writes(session, tx)
    tx.flushed = True
    ctx = current_context()
    now = tx.clock.now()
    # (info, state) of each root whose version the flush checks, described only if the
    # check fails; and the UPDATEs qx writes itself (qx.db._updates).
    checked: list[tuple[EntityInfo, InstanceState[Any]]] = []
    writes: list[PlannedUpdate] = []
    changed, child_changed = stamp_new(session.new, session, ctx, now, tx)

    dirty_roots: list[Any] = []
    dirty_parts: list[InstanceState[Any]] = []
    for obj in session.dirty:
        state = instance_state(obj)
        info = entity_info(state.mapper)
        if info.tenant_key is not None:
            _check_tenant(obj, info, tenant_for_write(info, ctx), ctx.system)
        if info.is_root:
            dirty_roots.append(obj)
            tx.track(obj)
        elif _net_modified(state):
            changed.add(state)
            dirty_parts.append(state)
            child_changed = child_changed or in_aggregate(state.mapper)
            _hold_linked_root(session, tx, state)
            if info.updated_key is not None:
                setattr(obj, info.updated_key, now)

    for obj in session.deleted:
        state = instance_state(obj)
        info = entity_info(state.mapper)
        if info.tenant_key is not None:
            _check_tenant(obj, info, tenant_for_write(info, ctx), ctx.system)
        changed.add(state)
        if info.is_root:
            tx.track(obj)  # its events must outlive the flush that deletes it
            if info.version_key is not None:
                checked.append((info, state))
        else:
            child_changed = child_changed or in_aggregate(state.mapper)
            _hold_linked_root(session, tx, state)

    if child_changed:
        _bump_for_parts(session, tx, dirty_roots, changed, now, checked, writes)
    else:
        for root in dirty_roots:
            _consider_bump(session, tx, root, False, now, checked, writes)
    tx.checked = checked
    # Roots first, then their parts, each in one order (by table, then key) so that
    # concurrent writers lock rows alike, as the flush orders its own.
    parts = [
        planned
        for state in dirty_parts
        if not state.deleted
        and state not in session._deleted
        and (planned := planned_update(state, entity_info(state.mapper))) is not None
    ]
    write_updates(session, _in_order(writes) + _in_order(parts))


def _in_order(writes: list[PlannedUpdate]) -> list[PlannedUpdate]:
    try:
        return sorted(writes, key=_row_order)
    except TypeError:  # keys of a type without an order: as text
        return sorted(writes, key=_row_text_order)


def _row_order(planned: PlannedUpdate) -> tuple[str, tuple[Any, ...]]:
    return planned.order


def _row_text_order(planned: PlannedUpdate) -> tuple[str, str]:
    return (planned.order[0], str(planned.order[1]))


def _consider_bump(
    session: QxSession,
    tx: TransactionState,
    root: Any,
    part_changed: bool,
    now: Any,
    checked: list[tuple[EntityInfo, InstanceState[Any]]],
    writes: list[PlannedUpdate],
) -> None:
    state = instance_state(root)
    if state.key is None or state.deleted or root in session.deleted:
        return  # new (its INSERT guards it) or deleted (its DELETE checks the version)
    info = entity_info(state.mapper)
    if tx.has_bumped(state):
        if state.modified:  # changed again since: checked against the version written
            _write_or_check(state, info, checked, writes)
        return
    if not (part_changed or _net_modified(state)):
        return
    tx.mark_bumped(state)
    _bump(root, state, info, now)
    _write_or_check(state, info, checked, writes)


def _write_or_check(
    state: InstanceState[Any],
    info: EntityInfo,
    checked: list[tuple[EntityInfo, InstanceState[Any]]],
    writes: list[PlannedUpdate],
) -> None:
    planned = planned_update(state, info)
    if planned is not None:
        writes.append(planned)  # qx writes it, and checks its version itself
    elif info.version_key is not None:
        checked.append((info, state))


def _bump_for_parts(
    session: QxSession,
    tx: TransactionState,
    dirty_roots: list[Any],
    changed: set[Any],
    now: Any,
    checked: list[tuple[EntityInfo, InstanceState[Any]]],
    writes: list[PlannedUpdate],
) -> None:
    # Parts hold no link to their root: walk the parts of every root this transaction holds
    # (new and deleted ones too, whose parts are new or deleted with them) to find the roots
    # of changed parts - and the changed parts no root claims.
    claimed: set[Any] = set()
    session_id = session.hash_key
    # By identity: the application's __eq__ may call two new roots equal (ids still None).
    roots = {id(root): root for root in (*dirty_roots, *tx.roots.values())}
    for root in roots.values():
        state = instance_state(root)
        if state.session_id != session_id:
            continue  # released to, or taken by, another session
        info = entity_info(state.mapper)
        if info.is_root:
            part_changed = _walk_parts(state, info, changed, claimed)
            _consider_bump(session, tx, root, part_changed, now, checked, writes)
    unclaimed = [
        s
        for s in changed
        if s not in claimed and not entity_info(s.mapper).is_root and in_aggregate(s.mapper)
    ]
    if not unclaimed:
        return
    # A root kept from an earlier transaction of this session is still in its identity map.
    for obj in list(session.identity_map.values()):
        state = instance_state(obj)
        info = entity_info(state.mapper)
        if info.is_root and instance_state(obj) not in tx.roots:
            tx.track(obj)
            if _walk_parts(state, info, changed, claimed):
                _consider_bump(session, tx, obj, True, now, checked, writes)
    for part_state in unclaimed:
        if part_state not in claimed:
            info = entity_info(part_state.mapper)
            ident = ":".join(str(v) for v in part_state.identity or ()) or "new"
            raise UnitOfWorkError(
                f"{info.name}({ident}) is a part of an aggregate whose root this unit of work "
                "has not loaded, so no version guards the change: load the root and change "
                "the part through it"
            )


@event.listens_for(QxSession, "after_attach")
def _track_attached(session: QxSession, obj: Any) -> None:
    # Added, merged or re-attached roots: held like loaded ones (see TransactionState).
    state = instance_state(obj)
    info = entity_info(state.mapper)
    if info.is_root:
        transaction_of(session).track(obj)
    # A row whose key was changed while it was detached (no session to note it then).
    if (
        state.key is not None
        and state.committed_state
        and any(key in state.committed_state for key in info.pk_keys)
    ):
        transaction_of(session).keys_changed = True


@event.listens_for(QxSession, "after_begin")
def _note_connection(session: QxSession, _transaction: Any, _connection: Any) -> None:
    # A connection joined the transaction: a COMMIT whose answer is lost has something to
    # find out (see qx.db._commit).
    transaction_of(session).connected = True


@event.listens_for(QxSession, "after_transaction_end")
def _forget_transaction(session: QxSession, transaction: Any) -> None:
    if transaction.parent is None:
        transaction_of(session).reset()


@event.listens_for(QxSession, "after_soft_rollback")
def _forget_undone_bumps(session: QxSession, transaction: Any) -> None:
    if transaction.nested:
        # The savepoint's rollback undid the bumps written in it: a root changed again must
        # be bumped again, or that change would pass unguarded. (Bumps made before the
        # savepoint are made once more: one more version, nothing lost.)
        transaction_of(session).bumped.clear()
