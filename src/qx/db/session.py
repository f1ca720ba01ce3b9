"""The session class qx's units of work use, and the hooks that enforce qx's rules.

* ``do_orm_execute``: tenant and soft-delete criteria on every ORM statement.
* ``before_flush``: tenant stamping and cross-tenant write refusal, audit timestamps, and the
  aggregate version bump: any change inside an aggregate (its own columns, its collections,
  or a child entity) bumps the root's version once per transaction, so the root's
  ``UPDATE … WHERE version = :loaded`` detects every concurrent change to the aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.orm import InstanceState, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.attributes import instance_state

from qx.core.clock import Clock, SystemClock
from qx.core.context import RequestContext, current_context
from qx.core.errors import TenantViolation
from qx.db.mapping import EntityInfo, entity_info
from qx.db.scoping import (
    WITH_DELETED,
    all_scoped_mappers,
    criteria_options,
    from_clause_mappers,
    scoped_closure,
    tenant_for_write,
)

__all__ = ["CLOCK", "FLUSHED", "QxSession", "has_writes", "stale_candidates", "stamp_new"]

#: ``Session.info`` key of the Clock used for audit timestamps and soft deletes.
CLOCK: Final = "qx_clock"
_BUMPED: Final = "qx_bumped"
_CANDIDATES: Final = "qx_version_checked"
#: ``Session.info`` key set once the transaction has written something.
FLUSHED: Final = "qx_flushed"
_SYSTEM_CLOCK: Final = SystemClock()


class QxSession(Session):
    """A SQLAlchemy ``Session`` carrying qx's scoping and versioning hooks."""

    def clock(self) -> Clock:
        """The clock used for audit columns and soft deletes."""
        clock: Clock = self.info.get(CLOCK, _SYSTEM_CLOCK)
        return clock


def has_writes(session: Session) -> bool:
    """Return whether the transaction flushed, or holds unflushed changes."""
    return bool(session.info.get(FLUSHED)) or bool(session.new or session.dirty or session.deleted)


def stale_candidates(session: Session) -> tuple[str, ...]:
    """Describe the aggregates whose version the last flush checked (for error messages)."""
    return tuple(session.info.get(_CANDIDATES, ()))


@event.listens_for(QxSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    # Relationship and column loads inherit the criteria of the statement that loaded their
    # parent (propagate_to_loaders), so adding them again would only duplicate the WHERE.
    if state.is_relationship_load or state.is_column_load:
        return
    if not (state.is_select or state.is_update or state.is_delete):
        return
    involved = state.all_mappers
    mappers: tuple[Any, ...] = ()
    if not involved:
        # SQLAlchemy could not name the entities (count/exists shapes): scope every class.
        mappers = all_scoped_mappers()
    for mapper in involved:
        closure = scoped_closure(mapper)
        if closure:
            mappers = closure if not mappers else tuple(dict.fromkeys(mappers + closure))
    if state.is_select:
        named = from_clause_mappers(state.statement)
        if named:
            mappers = tuple(dict.fromkeys(mappers + named))
    if not mappers:
        return
    options = criteria_options(
        mappers,
        current_context(),
        with_deleted=bool(state.execution_options.get(WITH_DELETED, False)),
    )
    if options:
        state.statement = state.statement.options(*options)


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


def _aggregate_changed(
    session: Session, state: InstanceState[Any], info: EntityInfo, changed: set[Any]
) -> bool:
    if state.modified and session.is_modified(state.obj(), include_collections=True):
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
    if not persistent:
        return  # a new row has no stored tenant to protect
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
    checked: list[str] = []
    changed, child_changed = stamp_new(session, ctx, now, bumped)

    dirty_roots: list[Any] = []
    for obj in session.dirty:
        info = _info(obj)
        if info.tenant_key is not None:
            _check_tenant(obj, info, tenant_for_write(info, ctx), ctx.system)
        if info.is_root:
            dirty_roots.append(obj)
        elif session.is_modified(obj, include_collections=False):
            changed.add(instance_state(obj))
            child_changed = True
            if info.updated_key is not None:
                setattr(obj, info.updated_key, now)

    for obj in session.deleted:
        info = _info(obj)
        if info.tenant_key is not None:
            _check_tenant(obj, info, tenant_for_write(info, ctx), ctx.system)
        changed.add(instance_state(obj))
        if info.is_root and info.version_key is not None:
            checked.append(info.describe(obj))
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
            checked.append(info.describe(root))
        if info.updated_key is not None:
            setattr(root, info.updated_key, now)
    if checked or _CANDIDATES in info_dict:
        info_dict[_CANDIDATES] = checked


@event.listens_for(QxSession, "after_transaction_end")
def _forget_bumps(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_BUMPED, None)
        session.info.pop(_CANDIDATES, None)
        session.info.pop(FLUSHED, None)
