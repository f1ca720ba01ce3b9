"""A changed row written by qx's own UPDATE where the flush would add nothing to it.

Any change inside an aggregate writes its root's row: the version grows (and ``updated_at``
moves), guarded by ``WHERE version = :loaded`` (:mod:`qx.db._session`); a changed part
writes its own row. Most such changes are to plain columns: the UPDATE then needs nothing
from the flush (no foreign key it copies from a related object, no value it generates or
fetches back). qx writes those rows itself from ``before_flush``, roots first, with a
statement built once per mapper and set of changed columns (:class:`~qx.db._model.UpdatePlan`);
the first also returns the transaction's name on PostgreSQL (see :mod:`qx.db._commit`), so
a unit of work that changed a loaded aggregate asks no separate question before COMMIT. The
values written become the row's committed state; a row with nothing else changed leaves the
flush altogether, so a unit of work that only changed plain columns does not run the flush's
machinery at all.

The flush writes a row, as SQLAlchemy would anyway, where that is not so: a mapper with
update listeners (they expect to see its UPDATE), inheritance or a version SQLAlchemy
generates, a column the database fills in on update, a column SQLAlchemy fills in on update
that the change does not set (qx sets ``updated_at`` itself), a many-to-one link changed
(its key is copied by the flush), a primary key changed, or a SQL expression assigned to an
attribute. A root whose collections changed is written here and its collections by the
flush.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import Column, Table
from sqlalchemy.orm import InstanceState, Mapper, Session
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.orm.interfaces import MANYTOMANY, ONETOMANY
from sqlalchemy.sql import ClauseElement

from qx.db._model import OLD_VERSION, EntityInfo, Unset, UpdatePlan, model_of
from qx.db._translate import translate_error
from qx.db._writes import WriteStatement, execute_update, names_transaction, own_columns

__all__ = ["PlannedUpdate", "planned_update", "write_updates"]


def _plan(mapper: Mapper[Any]) -> UpdatePlan | None:
    model = model_of(mapper)
    if isinstance(model.update_plan, Unset):
        model.update_plan = _build_plan(mapper)
    return model.update_plan


def _build_plan(mapper: Mapper[Any]) -> UpdatePlan | None:
    own = own_columns(mapper)
    table = mapper.local_table
    if (
        own is None
        or not isinstance(table, Table)
        or any(c.server_onupdate is not None for c in table.c)
        or (mapper.version_id_col is not None and mapper.version_id_generator is not False)
    ):
        return None  # the row spans tables, or the database or SQLAlchemy give it values
    columns = {key: (position, column) for position, (key, column) in enumerate(own)}
    quiet = frozenset(
        rel.key
        for rel in mapper.relationships
        if rel.viewonly or (rel.direction in (ONETOMANY, MANYTOMANY) and not rel.post_update)
    )
    pk = tuple(mapper.primary_key)
    if not all(isinstance(column, Column) and column.table is table for column in pk):
        return None
    version = mapper.version_id_col
    return UpdatePlan(
        table=table,
        columns=columns,
        refreshed=frozenset(p for p, column in columns.values() if column.onupdate is not None),
        quiet=quiet,
        pk=pk,  # type: ignore[arg-type]
        version=version if isinstance(version, Column) else None,
        set_names=tuple(f"qx_set{p}" for p in range(len(columns))),
        key_names=tuple(f"qx_key{n}" for n in range(len(pk))),
    )


class PlannedUpdate(NamedTuple):
    """One row's UPDATE, decided in ``before_flush`` and written with the others after."""

    state: InstanceState[Any]
    info: EntityInfo
    #: the table's name and the row's key: the order rows are written in
    order: tuple[str, tuple[Any, ...]]
    statement: WriteStatement
    params: dict[str, Any]
    #: (position, attribute key, value) of the columns it sets
    changed: list[tuple[int, str, Any]]
    #: whether it checks a version (its row count must be known row by row)
    versioned: bool
    #: whether every attribute it had changed is among ``changed``
    whole: bool


def planned_update(state: InstanceState[Any], info: EntityInfo) -> PlannedUpdate | None:
    """The UPDATE qx writes for the changed columns of the persistent ``state`` (a root
    whose version was just bumped, or a part); ``None``: the flush writes it."""
    mapper = state.mapper
    plan = _plan(mapper)
    if plan is None or mapper.dispatch.before_update or mapper.dispatch.after_update:
        return None
    committed = state.committed_state
    given = state.dict
    changed: list[tuple[int, str, Any]] = []
    for key, old in committed.items():
        found = plan.columns.get(key)
        if found is None:
            if key in plan.quiet:
                continue
            return None  # a link whose key the flush copies, or something qx does not know
        position, column = found
        value = given.get(key, NO_VALUE)
        if (
            value is NO_VALUE
            or column.primary_key
            or isinstance(value, ClauseElement)
            or hasattr(value, "__clause_element__")
        ):
            return None  # SQLAlchemy evaluates, fetches back or re-keys: the flush's job
        if old is not NO_VALUE and state.manager[key].impl.is_equal(value, old) is True:
            continue
        changed.append((position, key, value))
    if not changed:
        return None
    changed.sort()
    positions = tuple(p for p, _, _ in changed)
    if not plan.refreshed.issubset(positions):
        return None  # a column SQLAlchemy fills in would change behind the object's back
    identity = state.key[1] if state.key is not None else None
    if identity is None or len(identity) != len(plan.pk):
        return None
    names = plan.set_names
    params: dict[str, Any] = {names[p]: value for p, _, value in changed}
    params.update(zip(plan.key_names, identity, strict=True))
    if plan.version is not None:
        version_key = info.version_key
        loaded = (
            NO_VALUE
            if version_key is None
            else committed.get(version_key, given.get(version_key, NO_VALUE))
        )
        if loaded is None or loaded is NO_VALUE:
            return None
        params[OLD_VERSION] = loaded
    return PlannedUpdate(
        state,
        info,
        (plan.table.name, identity),
        plan.statement(positions),
        params,
        changed,
        versioned=plan.version is not None,
        whole=len(changed) == len(committed),
    )


def write_updates(session: Session, planned: list[PlannedUpdate]) -> None:
    """Write the ``planned`` UPDATEs in their order, rows of one statement together, and
    make what they wrote the rows' committed state.

    Rows of one statement go in one ``executemany`` where the driver can still tell how many
    rows matched (or nothing checks it), else one by one; the first write of a transaction
    whose name is not known yet goes alone, to bring the name back. A row left with nothing
    for the flush to do is settled: taken out of the flush altogether, as the flush would
    leave it afterwards - not inside a savepoint (rolling one back expires only what its
    flushes touched) nor for a session with ``after_flush`` listeners (they expect to see
    every flushed row).

    Raises:
        ConcurrencyConflict: a row's version is no longer the one loaded, or it is gone.
    """
    if not planned:
        return
    batches = session.connection().dialect.supports_sane_multi_rowcount
    start = 0
    while start < len(planned):
        first = planned[start]
        end = start + 1
        if batches or not first.versioned:
            while end < len(planned) and planned[end].statement is first.statement:
                end += 1
        group = planned[start:end]
        if len(group) > 1 and names_transaction(session):
            group, end = group[:1], start + 1  # the name comes back from one row alone
        matched = execute_update(session, first.statement, [row.params for row in group])
        if matched != len(group) and (len(group) == 1 or batches):
            error = StaleDataError(
                f"UPDATE statement on table {group[0].statement.statement.table} expected "
                f"to update {len(group)} row(s); {matched} were matched."
            )
            stale = tuple(row.info.describe(row.state.obj()) for row in group)
            conflict = translate_error(error, stale=stale)
            assert conflict is not None  # a stale-data error always has its qx error
            raise conflict from error
        start = end
    settles = _settles(session)
    for row in planned:
        state = row.state
        if row.whole and settles:
            # Everything it had changed is written: as the flush leaves a row it wrote
            # (every attribute committed, no longer modified), so the flush skips it.
            state._commit_all(state.dict, session.identity_map)
        else:
            obj = state.obj()
            for _, key, value in row.changed:
                orm_attributes.set_committed_value(obj, key, value)


def _settles(session: Session) -> bool:
    dispatch = session.dispatch
    return not (
        session.in_nested_transaction() or dispatch.after_flush or dispatch.after_flush_postexec
    )
