"""Set-based writes for repositories: ``upsert`` (ON CONFLICT) and deleting owned parts.

Kept apart from the repository so its class stays about the single-entity API; both
functions take the repository's :class:`~qx.db.query._spec.QuerySpec` (its mapping) and
:class:`~qx.db.query._spec.Bound` (its session, dialect and clock).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import Column, Table, UniqueConstraint, delete, select
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import instance_state

from qx.core._context import current_context
from qx.core._errors import InvalidQuery, TenantViolation, shown
from qx.db._scoping import tenant_for_write
from qx.db._translate import translating
from qx.db.query._spec import Bound, QuerySpec

__all__ = ["delete_owned", "upsert_rows"]

#: Bind parameters per statement stay under the drivers' 32,767 limit.
_MAX_PARAMS: Final = 30_000


def _unique_sets(table: Table) -> list[frozenset[str]]:
    sets = [frozenset(c.name for c in table.primary_key.columns)]
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint):
            sets.append(frozenset(c.name for c in constraint.columns))
    for index in table.indexes:
        if index.unique and all(isinstance(e, Column) for e in index.expressions):
            sets.append(frozenset(c.name for c in index.columns))
    for column in table.columns:
        if column.unique:
            sets.append(frozenset({column.name}))
    return sets


def _conflict_columns(spec: QuerySpec, table: Table, conflict: Sequence[str]) -> list[str]:
    if isinstance(conflict, str) or not conflict:
        raise InvalidQuery("upsert() needs conflict=[column, ...]", field="conflict")
    names = []
    for key in conflict:
        names.append(_column_of(spec, key, "conflict").name)
    wanted = frozenset(names)
    tenant = spec.info.tenant_key
    tenant_name = _column_of(spec, tenant, "conflict").name if tenant else None
    for candidate in _unique_sets(table):
        if candidate == wanted:
            return sorted(candidate)
        if tenant_name and candidate == wanted | {tenant_name}:
            return sorted(candidate)
    raise InvalidQuery(
        f"upsert() conflict columns {sorted(wanted)} are not a primary key or unique "
        f"constraint of {table.name}",
        field="conflict",
    )


def _column_of(spec: QuerySpec, key: str, what: str) -> Column[Any]:
    prop = spec.mapper.attrs.get(key) if isinstance(key, str) else None
    columns = getattr(prop, "columns", None)
    if not columns or len(columns) != 1 or not isinstance(columns[0], Column):
        raise InvalidQuery(f"{spec.info.name} has no column field {shown(key)}", field=what)
    column: Column[Any] = columns[0]
    return column


def _row(
    spec: QuerySpec,
    entity: Any,
    tenant: tuple[str, str | None, bool] | None,
    stamps: dict[str, Any],
) -> dict[str, Any]:
    """One entity's INSERT values. ``tenant`` is ``(column, value, system)`` for tenanted
    tables; ``stamps`` are the values qx maintains (audit, version, soft delete)."""
    info = spec.info
    state = instance_state(entity)
    for key in info.owned:
        if state.dict.get(key):
            raise InvalidQuery(
                f"upsert() writes {info.name} rows only; its {shown(key)} would be lost",
                field=key,
            )
    row: dict[str, Any] = {}
    for prop in spec.mapper.column_attrs:
        column = prop.columns[0]
        value = state.dict.get(prop.key)
        if value is None and isinstance(column, Column) and column.default is not None:
            default = column.default
            if getattr(default, "is_scalar", False):
                value = default.arg  # type: ignore[attr-defined]
            elif getattr(default, "is_callable", False):
                value = default.arg(None)  # type: ignore[attr-defined]
        row[column.name] = value
    if tenant is not None:
        name, value, system = tenant
        if row[name] is None:
            row[name] = value
        elif row[name] != value and not system:
            raise TenantViolation(f"{info.describe(entity)} belongs to tenant {shown(row[name])}")
    row.update(stamps)
    return row


async def upsert_rows(
    spec: QuerySpec,
    bound: Bound,
    entities: list[Any],
    conflict: Sequence[str],
    update: Sequence[str] | None,
) -> list[Any]:
    """The statements of :meth:`qx.db.Repository.upsert`; returns the stored primary keys."""
    info = spec.info
    table = spec.mapper.local_table
    if not isinstance(table, Table):  # pragma: no cover - qx maps tables only
        raise InvalidQuery(f"{info.name} is not mapped to a table")
    if not entities:
        return []
    keys = _conflict_columns(spec, table, conflict)
    managed = {
        _column_of(spec, k, k).name
        for k in (*info.pk_keys, info.version_key, info.tenant_key, info.created_key)
        if k is not None
    }
    if update is None:
        targets = [
            c.name
            for c in table.columns
            if c.name not in managed
            and c.name not in keys
            and c.name != _name(spec, info.updated_key)
            and c.name != _name(spec, info.deleted_key)
        ]
    else:
        if isinstance(update, str):
            raise InvalidQuery("update must be a list of column names", field="update")
        targets = []
        for key in update:
            name = _column_of(spec, key, "update").name
            if name in managed or name in keys:
                raise InvalidQuery(f"upsert() cannot overwrite {shown(key)}", field="update")
            targets.append(name)
    ctx = current_context()
    tenant = tenant_for_write(info, ctx) if info.tenant_key is not None else None
    now = bound.clock().now()
    # What qx maintains, resolved once for the whole batch.
    stamps: dict[str, Any] = {}
    for stamp in (info.created_key, info.updated_key):
        if stamp is not None:
            stamps[_name(spec, stamp)] = now
    if info.version_key is not None:
        stamps[_name(spec, info.version_key)] = 1
    if info.deleted_key is not None:
        stamps[_name(spec, info.deleted_key)] = None
    tenancy = None
    if info.tenant_key is not None:
        tenancy = (_name(spec, info.tenant_key), tenant, ctx.system)
    rows = [_row(spec, entity, tenancy, stamps) for entity in entities]
    dialect = bound.dialect(spec.mapper)
    per_statement = max(1, _MAX_PARAMS // max(1, len(table.columns)))
    session = bound.session
    stored: list[Any] = []
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        stmt = dialect.insert(table).values(chunk)
        excluded = stmt.excluded
        values: dict[str, Any] = {name: excluded[name] for name in targets}
        if info.version_key is not None:
            version = table.c[_name(spec, info.version_key)]
            values[version.name] = version + 1
        for stamp in (info.updated_key, info.deleted_key):
            if stamp is not None:
                values[_name(spec, stamp)] = excluded[_name(spec, stamp)]
        where = None
        if info.tenant_key is not None:
            tenant_column = table.c[_name(spec, info.tenant_key)]
            where = tenant_column == excluded[tenant_column.name]
        upsert = stmt.on_conflict_do_update(index_elements=keys, set_=values, where=where)
        pks = [table.c[_name(spec, k)] for k in info.pk_keys]
        with translating(session.sync_session):
            result = await session.execute(upsert.returning(*pks))
            ids = [row[0] if len(row) == 1 else tuple(row) for row in result.all()]
        if len(ids) != len(chunk):
            raise TenantViolation(
                f"upsert() met {len(chunk) - len(ids)} {info.name} row(s) of another tenant "
                f"on {keys}; nothing of theirs was changed"
            )
        stored.extend(ids)
    return stored


def _name(spec: QuerySpec, key: str | None) -> str:
    return _column_of(spec, key, key).name if key is not None else ""


async def delete_owned(bound: Bound, mapper: Mapper[Any], parents: list[Any]) -> None:
    """Delete owned parts and association rows of the rows whose primary keys are ``parents``.

    Bulk DELETE bypasses the ORM's cascades, so an aggregate's parts are removed here, deepest
    first. The keys are read before anything is deleted: a filter on an association (``groups
    __name``) would otherwise stop matching once its rows are gone.
    """
    if not parents or len(mapper.primary_key) != 1:
        return  # composite keys: left to the database's ON DELETE rules
    session = bound.session
    dialect = bound.dialect(mapper)
    for rel in mapper.relationships:
        pairs = list(rel.synchronize_pairs)
        if len(pairs) != 1 or pairs[0][0] is not mapper.primary_key[0]:
            continue
        child_column = pairs[0][1]
        if rel.secondary is not None:
            association: Any = rel.secondary
            stmt: Any = delete(association).where(dialect.in_(child_column, parents))
            with translating(session.sync_session):
                await session.execute(stmt)
            continue
        if not rel.cascade.delete_orphan:
            continue
        child = rel.mapper
        child_fk = getattr(child.class_, child.get_property_by_column(child_column).key)
        matching = dialect.in_(child_fk, parents)
        if len(child.primary_key) == 1 and child.relationships:
            child_pk = getattr(child.class_, child.get_property_by_column(child.primary_key[0]).key)
            with translating(session.sync_session):
                keys = list((await session.scalars(select(child_pk).where(matching))).all())
            await delete_owned(bound, child, keys)
        with translating(session.sync_session):
            await session.execute(
                delete(child.class_).where(matching),
                execution_options={"synchronize_session": "fetch"},
            )
