"""A changed aggregate root's row, written by qx's own UPDATE when the flush would add nothing.

Any change inside an aggregate writes its root's row: the version grows (and ``updated_at``
moves), guarded by ``WHERE version = :loaded`` (:mod:`qx.db._session`). Most such changes are
to parts only, or to the root's plain columns; the root's UPDATE then needs nothing from the
flush (no foreign key it copies from a related object, no value it generates or fetches back).
qx writes that row itself, right after the bump, with a statement built once per mapper and
set of changed columns, which also returns the transaction's name on PostgreSQL (see
:mod:`qx.db._commit`): a unit of work that changed a loaded aggregate asks no separate
question before COMMIT. The values it wrote become the row's committed state, so the flush
finds nothing left to write for the root and writes its parts as before.

The flush writes the root's row, as SQLAlchemy would anyway, when that is not so: a mapper
with update listeners (they expect to see its UPDATE), inheritance, a column the database
fills in on update, a column SQLAlchemy fills in on update that the change does not set
(qx sets ``updated_at`` itself), a many-to-one link changed (its key is copied by the
flush), a primary key changed, or a SQL expression assigned to an attribute.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Table
from sqlalchemy.orm import InstanceState, Mapper, Session
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.orm.interfaces import MANYTOMANY, ONETOMANY
from sqlalchemy.sql import ClauseElement

from qx.db._model import OLD_VERSION, EntityInfo, RootUpdatePlan, Unset, model_of
from qx.db._translate import translate_error
from qx.db._writes import execute_update

__all__ = ["write_root"]


def _plan(mapper: Mapper[Any]) -> RootUpdatePlan | None:
    model = model_of(mapper)
    if isinstance(model.root_update, Unset):
        model.root_update = _build_plan(mapper)
    return model.root_update


def _build_plan(mapper: Mapper[Any]) -> RootUpdatePlan | None:
    table = mapper.local_table
    if (
        not isinstance(table, Table)
        or mapper.inherits is not None
        or mapper.polymorphic_on is not None
        or len(mapper.tables) != 1
        or any(c.server_onupdate is not None for c in table.c)
    ):
        return None
    columns: dict[str, tuple[int, Column[Any]]] = {}
    for prop in mapper.column_attrs:
        if len(prop.columns) != 1 or prop.columns[0].table is not table:
            return None
        column = prop.columns[0]
        if not isinstance(column, Column) or column.computed is not None:
            return None
        columns[prop.key] = (len(columns), column)
    quiet = frozenset(
        rel.key
        for rel in mapper.relationships
        if rel.viewonly or (rel.direction in (ONETOMANY, MANYTOMANY) and not rel.post_update)
    )
    pk = tuple(mapper.primary_key)
    if not all(isinstance(column, Column) and column.table is table for column in pk):
        return None
    version = mapper.version_id_col
    return RootUpdatePlan(
        table=table,
        columns=columns,
        refreshed=frozenset(p for p, column in columns.values() if column.onupdate is not None),
        quiet=quiet,
        pk=pk,  # type: ignore[arg-type]
        version=version if isinstance(version, Column) else None,
    )


def write_root(session: Session, state: InstanceState[Any], info: EntityInfo) -> bool:
    """Write the changed columns of the persistent root ``state`` (its version just bumped)
    with qx's UPDATE, and make them its committed state; ``False``: the flush writes it.

    Raises:
        ConcurrencyConflict: the row's version is no longer the one loaded, or it is gone.
    """
    mapper = state.mapper
    plan = _plan(mapper)
    if plan is None or mapper.dispatch.before_update or mapper.dispatch.after_update:
        return False
    committed = state.committed_state
    given = state.dict
    changed: list[tuple[int, str, Any]] = []
    for key, old in committed.items():
        found = plan.columns.get(key)
        if found is None:
            if key in plan.quiet:
                continue
            return False  # a link whose key the flush copies, or something qx does not know
        position, column = found
        value = given.get(key, NO_VALUE)
        if value is NO_VALUE or isinstance(value, ClauseElement) or column.primary_key:
            return False
        if hasattr(value, "__clause_element__"):
            return False
        if old is not NO_VALUE and state.manager[key].impl.is_equal(value, old) is True:
            continue
        changed.append((position, key, value))
    if not changed:
        return False
    positions = tuple(sorted(p for p, _, _ in changed))
    if not plan.refreshed.issubset(positions):
        return False  # a column SQLAlchemy fills in would change behind the object's back
    changed.sort()
    params: dict[str, Any] = {f"qx_set{p}": value for p, _, value in changed}
    identity = state.key[1] if state.key is not None else None
    if identity is None or len(identity) != len(plan.pk):
        return False
    for n, value in enumerate(identity):
        params[f"qx_key{n}"] = value
    if plan.version is not None:
        version_key = info.version_key
        loaded = committed.get(version_key, NO_VALUE) if version_key is not None else NO_VALUE
        if loaded is NO_VALUE:
            loaded = given.get(version_key) if version_key is not None else None
        if loaded is None or loaded is NO_VALUE:
            return False
        params[OLD_VERSION] = loaded
    statement = plan.statement(positions)
    if execute_update(session, statement, params) != 1:
        error = StaleDataError(
            f"UPDATE statement on table {plan.table.name!r} expected to update 1 row(s); "
            "0 were matched."
        )
        conflict = translate_error(error, stale=(info.describe(state.obj()),))
        assert conflict is not None  # a stale-data error always has its qx error
        raise conflict from error
    obj = state.obj()
    for _, key, value in changed:
        orm_attributes.set_committed_value(obj, key, value)
    return True
