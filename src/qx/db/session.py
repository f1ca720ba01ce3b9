"""The session class qx's units of work use, and the hooks that enforce qx's rules.

* ``execute`` / ``scalar`` / ``scalars``: tenant and soft-delete criteria on every ORM
  statement, SQLAlchemy's own loads included (:func:`qx.db.scoping.scope_statement`).
* ``before_flush``: tenant stamping and cross-tenant write refusal, audit timestamps, and the
  aggregate version bump: any change inside an aggregate (its own columns, its collections,
  or a child entity) bumps the root's version once per transaction, so the root's
  ``UPDATE … WHERE version = :loaded`` detects every concurrent change to the aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.orm import InstanceState, PassiveFlag, Session, UOWTransaction
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.attributes import instance_state

from qx.core.clock import Clock, SystemClock
from qx.core.context import RequestContext, current_context
from qx.core.errors import TenantViolation
from qx.db.mapping import HELD_ROOTS, EntityInfo, entity_info, mapper_notes
from qx.db.scoping import scope_statement, tenant_for_write

__all__ = [
    "CLOCK",
    "FLUSHED",
    "QxSession",
    "has_writes",
    "held_roots",
    "release_roots",
    "stale_candidates",
    "stamp_new",
]

#: ``Session.info`` key of the Clock used for audit timestamps and soft deletes.
CLOCK: Final = "qx_clock"
_BUMPED: Final = "qx_bumped"
_CANDIDATES: Final = "qx_version_checked"
#: ``Session.info`` key set once the transaction has written something.
FLUSHED: Final = "qx_flushed"
_SYSTEM_CLOCK: Final = SystemClock()
_NO_LOAD: Final = PassiveFlag.PASSIVE_NO_INITIALIZE


class QxSession(Session):
    """A SQLAlchemy ``Session`` carrying qx's scoping and versioning hooks.

    Statements are scoped in ``execute``, ``scalar`` and ``scalars`` - the methods every
    statement passes through, SQLAlchemy's own primary-key, relationship and refresh loads
    included - rather than in a ``do_orm_execute`` listener: with any such listener,
    SQLAlchemy prepares every ORM statement twice, which cost a primary-key load of an order
    with its lines about 5% of its CPU time. Users' own ``do_orm_execute`` listeners still
    run, and see the scoped statement.
    """

    #: Roots mapped with owned parts are held while a transaction runs (see
    #: ``qx.db.mapping.map_aggregate``): a changed part must find its root at flush.
    holds_loaded_roots: Final = True

    def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        """``Session.execute`` of the statement with qx's scoping applied."""
        scoped = scope_statement(self, statement, kw.get("execution_options"))
        return super().execute(scoped, params, **kw)

    def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        """``Session.scalar`` of the statement with qx's scoping applied."""
        scoped = scope_statement(self, statement, kw.get("execution_options"))
        return super().scalar(scoped, params, **kw)

    def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        """``Session.scalars`` of the statement with qx's scoping applied."""
        scoped = scope_statement(self, statement, kw.get("execution_options"))
        return super().scalars(scoped, params, **kw)

    def clock(self) -> Clock:
        """The clock used for audit columns and soft deletes."""
        clock: Clock = self.info.get(CLOCK, _SYSTEM_CLOCK)
        return clock


def has_writes(session: Session) -> bool:
    """Return whether the transaction flushed, or holds unflushed changes."""
    # check_modified() reads the identity map's modified set; ``session.dirty`` would diff
    # every loaded object's attributes, which a read-only unit of work pays on every exit.
    return (
        bool(session.info.get(FLUSHED))
        or session.identity_map.check_modified()
        or bool(session.new or session.deleted)
    )


def stale_candidates(session: Session) -> tuple[str, ...]:
    """Describe the aggregates whose version the last flush checked (for error messages)."""
    # Built from identity keys: after a failed flush the objects are expired, and reading
    # their attributes would try to load them again.
    return tuple(
        f"{info.name}({':'.join(str(v) for v in state.identity or ())})"
        for info, state in session.info.get(_CANDIDATES, ())
    )


def _info(obj: Any) -> EntityInfo:
    # Through the instance state: cheaper than resolving the class's mapper each time.
    return entity_info(instance_state(obj).mapper)


def _owned_children(state: InstanceState[Any], info: EntityInfo) -> Iterator[Any]:
    for key in info.owned:
        value = state.dict.get(key)  # only what is loaded: unloaded parts cannot have changed
        if value is None:
            continue
        if isinstance(value, Iterable) and not isinstance(value, str | bytes):
            yield from value
        else:
            yield value


def _collection_keys(mapper: Any) -> frozenset[str]:
    notes = mapper_notes(mapper)
    keys: frozenset[str] | None = notes.get("qx_collections")
    if keys is None:
        keys = notes["qx_collections"] = frozenset(
            rel.key for rel in mapper.relationships if rel.uselist
        )
    return keys


def _net_modified(state: InstanceState[Any], *, include_collections: bool) -> bool:
    # What session.is_modified() answers, looking only at the attributes touched since the
    # last flush (the committed_state keys): is_modified() diffs every attribute.
    if not state.modified:
        return False
    obj = state.obj()
    skip = frozenset() if include_collections else _collection_keys(state.mapper)
    for key in list(state.committed_state):
        if key in skip:
            continue
        if orm_attributes.get_history(obj, key, passive=_NO_LOAD).has_changes():
            return True
    return False


def _aggregate_changed(
    session: Session, state: InstanceState[Any], info: EntityInfo, changed: set[Any]
) -> bool:
    if _net_modified(state, include_collections=True):
        return True
    for child in _owned_children(state, info):
        child_state = instance_state(child)
        if child_state in changed:
            return True
        child_info = entity_info(child_state.mapper)
        if child_info.owned and _aggregate_changed(session, child_state, child_info, changed):
            return True
    return False


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
    session: Session, ctx: RequestContext, now: Any, bumped: set[InstanceState[Any]]
) -> tuple[set[InstanceState[Any]], bool]:
    """Stamp tenant, audit and version columns of new objects; return them and whether a
    new part (not root) is among them."""
    changed: set[InstanceState[Any]] = set()
    child_changed = False
    for obj in session.new:
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
            bumped.add(state)  # a new row needs no bump: its INSERT is its own guard
            if info.version_key is not None and getattr(obj, info.version_key) is None:
                setattr(obj, info.version_key, 1)
        else:
            child_changed = True
    return changed, child_changed


@event.listens_for(QxSession, "before_flush")
def _before_flush(session: Session, _flush: UOWTransaction, _instances: Any) -> None:
    info_dict = session.info
    info_dict[FLUSHED] = True
    ctx = current_context()
    now = info_dict.get(CLOCK, _SYSTEM_CLOCK).now()
    bumped: set[InstanceState[Any]] | None = info_dict.get(_BUMPED)
    if bumped is None:
        bumped = info_dict[_BUMPED] = set()
    # (info, state) of each version-checked root, described only if the check fails.
    checked: list[tuple[EntityInfo, InstanceState[Any]]] = []
    changed, child_changed = stamp_new(session, ctx, now, bumped)

    dirty_roots: list[Any] = []
    for obj in session.dirty:
        info = _info(obj)
        if info.tenant_key is not None:
            _check_tenant(obj, info, tenant_for_write(info, ctx), ctx.system)
        if info.is_root:
            dirty_roots.append(obj)
        elif _net_modified(instance_state(obj), include_collections=False):
            changed.add(instance_state(obj))
            child_changed = True
            if info.updated_key is not None:
                setattr(obj, info.updated_key, now)

    for obj in session.deleted:
        info = _info(obj)
        if info.tenant_key is not None:
            _check_tenant(obj, info, tenant_for_write(info, ctx), ctx.system)
        deleted_state = instance_state(obj)
        changed.add(deleted_state)
        if info.is_root and info.version_key is not None:
            checked.append((info, deleted_state))
        else:
            child_changed = True

    roots: Iterable[Any] = dirty_roots
    if child_changed and session.identity_map:
        # A changed part must bump its root; parts hold no link to their root, so look at the
        # loaded roots (the identity map) whose owned collections contain changed parts.
        # New roots need no look: their INSERT already guards them.
        roots = dict.fromkeys(
            [*dirty_roots, *(o for o in session.identity_map.values() if _info(o).is_root)]
        )
    for root in roots:
        state = instance_state(root)
        if state in bumped or state.deleted or root in session.deleted:
            continue
        info = entity_info(state.mapper)
        if not _aggregate_changed(session, state, info, changed):
            continue
        bumped.add(state)
        if info.version_key is not None:
            setattr(root, info.version_key, (getattr(root, info.version_key) or 0) + 1)
            checked.append((info, state))
        if info.updated_key is not None:
            setattr(root, info.updated_key, now)
    if checked or _CANDIDATES in info_dict:
        info_dict[_CANDIDATES] = checked


def held_roots(session: Session) -> int:
    """Return how many loaded roots the session holds now (a mark for :func:`release_roots`)."""
    return len(session.info.get(HELD_ROOTS, ()))


def release_roots(session: Session, *, after: int, keep_last: int) -> None:
    """Stop holding the roots loaded after mark ``after`` that are untouched, except the last
    ``keep_last`` (loaded but not yet handed to the caller).

    ``Query.stream`` calls it per chunk so memory stays flat; a root whose part was changed
    stays held, so its version bump still happens.
    """
    held: list[Any] | None = session.info.get(HELD_ROOTS)
    if not held or len(held) - after <= keep_last:
        return
    end = len(held) - keep_last
    kept = [root for root in held[after:end] if _touched(instance_state(root))]
    held[after:end] = kept


def _touched(state: InstanceState[Any]) -> bool:
    if state.modified:
        return True
    return any(
        _touched(instance_state(child))
        for child in _owned_children(state, entity_info(state.mapper))
    )


@event.listens_for(QxSession, "after_transaction_end")
def _forget_bumps(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(HELD_ROOTS, None)
        session.info.pop(_BUMPED, None)
        session.info.pop(_CANDIDATES, None)
        session.info.pop(FLUSHED, None)
