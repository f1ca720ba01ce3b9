"""Tenant and soft-delete scoping, applied to every ORM statement a session runs.

The session's ``do_orm_execute`` hook adds ``with_loader_criteria`` for every scoped class a
statement can reach — the classes in the statement and every class reachable from them
through relationships — so SELECTs, relationship loads (which inherit the criteria), and
ORM-enabled bulk UPDATE/DELETE are all filtered. Objects the identity map returns without
SQL are checked by :func:`visible` instead.

Scoping reads :func:`qx.core.context.current_context`: no tenant and no system context means
refusal (``TenantRequired``), never "all tenants".

Known limit: a hand-written statement whose subquery uses a scoped class that is neither the
statement's entity nor reachable from it through relationships gets no criteria for that
class. Repositories never build such statements; code using ``uow.session`` directly must
filter that subquery itself (or use ``select_from``/count shapes, which scope every class).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final
from weakref import WeakSet

from sqlalchemy import and_
from sqlalchemy.orm import Mapper, registry, with_loader_criteria
from sqlalchemy.orm.interfaces import ORMOption

from qx.core.context import RequestContext
from qx.core.errors import TenantRequired
from qx.db.mapping import EntityInfo, entity_info, mapper_notes

__all__ = [
    "WITH_DELETED",
    "all_scoped_mappers",
    "criteria_options",
    "from_clause_mappers",
    "remember_registry",
    "scoped_closure",
    "tenant_for_write",
    "visible",
]

#: Execution option that lifts soft-delete filtering for one statement.
WITH_DELETED: Final = "qx_with_deleted"


# Registries that qx's mapping helpers were used with; filled by user code, never at import.
_registries: WeakSet[registry] = WeakSet()
_all_scoped: dict[int, tuple[Mapper[Any], ...]] = {}


def remember_registry(reg: registry) -> None:
    """Note a registry whose scoped classes guard statements qx cannot attribute."""
    _registries.add(reg)
    _all_scoped.clear()


def all_scoped_mappers() -> tuple[Mapper[Any], ...]:
    """Every scoped mapper of the registries qx mapped into.

    Used for ORM statements whose entities SQLAlchemy cannot name (``select(func.count())
    .select_from(Order)``, bare ``exists()``): scoping them all costs more, but never leaks.
    """
    size = sum(len(reg.mappers) for reg in _registries)
    cached = _all_scoped.get(size)
    if cached is None:
        cached = tuple(
            mapper
            for reg in list(_registries)
            for mapper in reg.mappers
            if _is_scoped(entity_info(mapper))
        )
        _all_scoped.clear()
        _all_scoped[size] = cached
    return cached


def _is_scoped(info: EntityInfo) -> bool:
    return info.tenant_key is not None or info.deleted_key is not None


def scoped_closure(mapper: Mapper[Any]) -> tuple[Mapper[Any], ...]:
    """Return the scoped mappers reachable from ``mapper`` (itself included), cached."""
    notes = mapper_notes(mapper)
    cached: tuple[Mapper[Any], ...] | None = notes.get("qx_scope_closure")
    if cached is not None:
        return cached
    seen: dict[Mapper[Any], None] = {}
    stack = [mapper]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen[current] = None
        stack.extend(rel.mapper for rel in current.relationships)
    closure = tuple(m for m in seen if _is_scoped(entity_info(m)))
    notes["qx_scope_closure"] = closure
    return closure


def from_clause_mappers(statement: Any) -> tuple[Mapper[Any], ...]:
    """Scoped mappers named by a statement's explicit ``select_from(...)``.

    SQLAlchemy's ``all_mappers`` only sees the selected columns; ``select(Alias.code)
    .select_from(Order).join(...)`` reads ``orders`` without naming it, so it is found here.
    """
    froms = getattr(statement, "_from_obj", ())
    if not froms:
        return ()
    found: list[Mapper[Any]] = []
    scoped = all_scoped_mappers()
    for clause in froms:
        annotations = getattr(clause, "_annotations", {})
        mapper = annotations.get("parentmapper")
        if mapper is not None:
            found.extend(scoped_closure(mapper))
            continue
        table = getattr(clause, "element", clause)  # an alias of a table reads the table
        found.extend(m for m in scoped if table in m.tables)
    return tuple(dict.fromkeys(found))


def criteria_options(
    mappers: tuple[Mapper[Any], ...], ctx: RequestContext, *, with_deleted: bool
) -> tuple[ORMOption, ...]:
    """Return the loader-criteria options scoping ``mappers`` for ``ctx``.

    Raises:
        TenantRequired: a tenant-scoped class is involved and ``ctx`` has no tenant and is
            not a system context.
    """
    tenant = None
    if not ctx.system:
        tenant = ctx.tenant_id
        if tenant is None:
            for mapper in mappers:
                info = entity_info(mapper)
                if info.tenant_key is not None:
                    raise TenantRequired(info.name)
    return _options(mappers, tenant, ctx.system, with_deleted)


@lru_cache(maxsize=4096)
def _options(
    mappers: tuple[Mapper[Any], ...], tenant: str | None, system: bool, with_deleted: bool
) -> tuple[ORMOption, ...]:
    # Options are immutable, so one tuple per (classes, tenant, flags) serves every statement;
    # the tenant value becomes a bound parameter and the statement cache still hits.
    options: list[ORMOption] = []
    for mapper in mappers:
        info = entity_info(mapper)
        clauses = []
        if info.tenant_key is not None and not system:
            clauses.append(getattr(info.cls, info.tenant_key) == tenant)
        if info.deleted_key is not None and not with_deleted:
            clauses.append(getattr(info.cls, info.deleted_key).is_(None))
        if clauses:
            options.append(
                with_loader_criteria(
                    info.cls,
                    and_(*clauses) if len(clauses) > 1 else clauses[0],
                    include_aliases=True,
                )
            )
    return tuple(options)


def visible(info: EntityInfo, obj: Any, ctx: RequestContext, *, with_deleted: bool) -> bool:
    """Return whether an already-loaded object may be seen in ``ctx``.

    Raises:
        TenantRequired: the class is tenant-scoped and ``ctx`` has no tenant.
    """
    if info.tenant_key is not None and not ctx.system:
        if ctx.tenant_id is None:
            raise TenantRequired(info.name)
        if getattr(obj, info.tenant_key) != ctx.tenant_id:
            return False
    return with_deleted or info.deleted_key is None or getattr(obj, info.deleted_key) is None


def tenant_for_write(info: EntityInfo, ctx: RequestContext) -> str | None:
    """Return the tenant new rows get in ``ctx`` (``None`` in a system context).

    Raises:
        TenantRequired: no tenant and not a system context.
    """
    if ctx.tenant_id is None and not ctx.system:
        raise TenantRequired(info.name)
    return ctx.tenant_id
