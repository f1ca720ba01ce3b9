"""Tenant and soft-delete scoping, applied to every ORM statement a session runs.

:func:`scope_statement` (called by ``QxSession.execute``/``scalar``/``scalars``) adds
``with_loader_criteria`` for every scoped class a statement can reach — the classes in the
statement and every class reachable from them through relationships — so SELECTs,
relationship loads (which inherit the criteria), and ORM-enabled bulk UPDATE/DELETE are all
filtered. Objects the identity map returns without SQL are checked by :func:`visible`
instead; ``Repository.get`` reads its row that way too (see ``RowsChecked``).

Scoping reads :func:`qx.core._context.current_context`: no tenant and no system context means
refusal (``TenantRequired``), never "all tenants".

Known limit: a hand-written statement whose subquery uses a scoped class that is neither the
statement's entity nor reachable from it through relationships gets no criteria for that
class. Repositories never build such statements; code using ``uow.session`` directly must
filter that subquery itself (or use ``select_from``/count shapes, which scope every class).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final

from sqlalchemy import Select, and_
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import (
    Mapper,
    Session,
    joinedload,
    with_loader_criteria,
)
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.orm.interfaces import ORMOption

from qx.core._context import RequestContext, current_context
from qx.core._errors import TenantRequired
from qx.db._bounded import Bounded
from qx.db._mapping import entity_info, known_registries
from qx.db._model import EntityInfo, JoinedPart, Unset, model_of
from qx.db._transaction import existing_transaction

__all__ = [
    "WITH_DELETED",
    "JoinedPart",
    "ScopedStatement",
    "all_scoped_mappers",
    "checks_rows_in_python",
    "criteria_options",
    "from_clause_mappers",
    "joined_part",
    "loader_where",
    "scope_statement",
    "scope_tenant",
    "scoped_closure",
    "tenant_for_write",
    "visible",
    "visible_parts",
]

WITH_DELETED: Final = "qx_with_deleted"
"""Execution option that lifts soft-delete filtering for one statement."""

# Execution option of a statement ScopedStatement scoped: the ScopedStatement that made it.
_SCOPED_BY: Final = "qx_scoped_by"
# Scoped variants kept per statement (tenants it ran for); beyond it, they are built again.
_VARIANTS: Final = 64


# Loader strategies that never read related rows inside the root statement nor later on
# their own: with these, checking the root in Python and scoping each eager relationship
# load is complete. Joined loads read children inside the root statement and lazy loads run
# after the root's context is gone, so classes using them keep the criteria path.
_SEPARATE_LOADS: Final = frozenset({"selectin", "raise", "raise_on_sql", "noload", "write_only"})


_all_scoped: dict[int, tuple[Mapper[Any], ...]] = {}


def all_scoped_mappers() -> tuple[Mapper[Any], ...]:
    """Every scoped mapper of the registries qx mapped into.

    Used for ORM statements whose entities SQLAlchemy cannot name (``select(func.count())
    .select_from(Order)``, bare ``exists()``): scoping them all costs more, but never leaks.
    """
    registries = known_registries()
    size = sum(len(reg.mappers) for reg in registries)
    cached = _all_scoped.get(size)
    if cached is None:
        cached = tuple(
            mapper
            for reg in registries
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
    model = model_of(mapper)
    if model.scope_closure is not None:
        return model.scope_closure
    seen: dict[Mapper[Any], None] = {}
    stack = [mapper]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen[current] = None
        stack.extend(rel.mapper for rel in current.relationships)
    closure = tuple(m for m in seen if _is_scoped(entity_info(m)))
    model.scope_closure = closure
    return closure


def checks_rows_in_python(mapper: Mapper[Any]) -> bool:
    """Return whether loads of ``mapper`` may use ``RowsChecked`` (cached per mapper).

    True when every relationship reachable from it loads related rows in statements of their
    own while the root load runs (``selectin``) or never (``raise``, ``noload``, ...).
    """
    model = model_of(mapper)
    cached = model.rows_checked
    if cached is None:
        seen: set[Mapper[Any]] = set()
        stack = [mapper]
        cached = True
        while stack and cached:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            # Inheritance brings joined/polymorphic loading shapes: keep the criteria path.
            if current.inherits is not None or current.polymorphic_on is not None:
                cached = False
            for rel in current.relationships:
                if rel.lazy not in _SEPARATE_LOADS:
                    cached = False
                stack.append(rel.mapper)
        model.rows_checked = cached
    return cached


def joined_part(mapper: Mapper[Any]) -> JoinedPart | None:
    """Return the owned relationship to join into ``mapper``'s primary-key load, if any.

    Only under :func:`checks_rows_in_python`, and only one relationship: the first owned
    (delete-orphan) one loaded ``selectin`` straight from the root's table (no secondary
    table). Joining a second collection would multiply rows; the others keep their own
    statements.
    """
    model = model_of(mapper)
    if isinstance(model.joined_part, Unset):
        chosen: JoinedPart | None = None
        if checks_rows_in_python(mapper):
            for rel in mapper.relationships:
                if rel.cascade.delete_orphan and rel.lazy == "selectin" and rel.secondary is None:
                    chosen = JoinedPart(
                        key=rel.key,
                        options=(joinedload(getattr(rel.parent.class_, rel.key)),),
                        info=entity_info(rel.mapper),
                        uselist=bool(rel.uselist),
                    )
                    break
        model.joined_part = chosen
    return model.joined_part


def visible_parts(root: Any, part: JoinedPart, ctx: RequestContext, *, with_deleted: bool) -> None:
    """Drop from ``root``'s loaded ``part`` relationship what ``ctx`` may not see.

    The relationship's committed value is replaced, so a hidden part is neither shown nor
    treated as removed (and deleted as an orphan) at the next flush.
    """
    info = part.info
    if info.tenant_key is None and (info.deleted_key is None or with_deleted):
        return  # nothing a part row could hide
    value = instance_state(root).dict.get(part.key)
    if value is None:
        return
    items = list(value) if part.uselist else [value]
    kept = [item for item in items if visible(info, item, ctx, with_deleted=with_deleted)]
    if len(kept) != len(items):
        set_committed_value(root, part.key, kept if part.uselist else None)


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


def scope_tenant(mappers: tuple[Mapper[Any], ...], ctx: RequestContext) -> str | None:
    """Return the tenant that statements over ``mappers`` are scoped to in ``ctx``.

    ``None`` in a system context.

    Raises:
        TenantRequired: a tenant-scoped class is among ``mappers`` and ``ctx`` has no tenant
            and is not a system context.
    """
    if ctx.system:
        return None
    if ctx.tenant_id is None:
        for mapper in mappers:
            info = entity_info(mapper)
            if info.tenant_key is not None:
                raise TenantRequired(info.name)
    return ctx.tenant_id


def criteria_options(
    mappers: tuple[Mapper[Any], ...], ctx: RequestContext, *, with_deleted: bool
) -> tuple[ORMOption, ...]:
    """Return the loader-criteria options scoping ``mappers`` for ``ctx``.

    Raises:
        TenantRequired: a tenant-scoped class is involved and ``ctx`` has no tenant and is
            not a system context.
    """
    return _options(mappers, scope_tenant(mappers, ctx), ctx.system, with_deleted)


def loader_where(
    mappers: tuple[Mapper[Any], ...], ctx: RequestContext, *, with_deleted: bool
) -> tuple[Any, ...]:
    """Return plain WHERE clauses scoping ``mappers`` for ``ctx`` (no loader options).

    Used for the relationship loads under ``RowsChecked``: one statement, one entity,
    so a WHERE costs SQLAlchemy far less per execution than ``with_loader_criteria``.

    Raises:
        TenantRequired: a tenant-scoped class is involved and ``ctx`` has no tenant and is
            not a system context.
    """
    return _where(mappers, scope_tenant(mappers, ctx), ctx.system, with_deleted)


@lru_cache(maxsize=4096)
def _options(
    mappers: tuple[Mapper[Any], ...], tenant: str | None, system: bool, with_deleted: bool
) -> tuple[ORMOption, ...]:
    # Options are immutable, so one tuple per (classes, tenant, flags) serves every statement;
    # the tenant value becomes a bound parameter and the statement cache still hits.
    options: list[ORMOption] = []
    for mapper in mappers:
        clauses = _where((mapper,), tenant, system, with_deleted)
        if clauses:
            options.append(
                with_loader_criteria(
                    mapper.class_,
                    and_(*clauses) if len(clauses) > 1 else clauses[0],
                    include_aliases=True,
                )
            )
    return tuple(options)


@lru_cache(maxsize=4096)
def _where(
    mappers: tuple[Mapper[Any], ...], tenant: str | None, system: bool, with_deleted: bool
) -> tuple[Any, ...]:
    clauses: list[Any] = []
    for mapper in mappers:
        info = entity_info(mapper)
        if info.tenant_key is not None and not system:
            clauses.append(getattr(info.cls, info.tenant_key) == tenant)
        if info.deleted_key is not None and not with_deleted:
            clauses.append(getattr(info.cls, info.deleted_key).is_(None))
    return tuple(clauses)


def scope_statement(session: Session, statement: Any, execution_options: Any) -> Any:
    """Return ``statement`` with the tenant and soft-delete scoping of ``current_context()``.

    Statements that are not ORM SELECT/UPDATE/DELETE come back unchanged (criteria for mapped
    classes cannot apply to them), as do column loads (a refresh of an object loaded, and
    scoped, before) and relationship loads (they inherit the criteria of the statement that
    loaded their parent) - except under ``RowsChecked``, where the parent's statement
    carried none and each relationship load gets a WHERE of its own.

    Raises:
        TenantRequired: a tenant-scoped class is involved and the context has no tenant.
    """
    if not (statement.is_select or statement.is_update or statement.is_delete):
        return statement
    if statement._propagate_attrs.get("compile_state_plugin") != "orm":
        return statement  # Core on tables: loader criteria never apply to it
    tx = existing_transaction(session)
    note = tx.rows_checked if tx is not None else None
    if statement.is_select:
        # SQLAlchemy marks its own loads in the statement's ORM compile options: a path below
        # the root for relationship loads, the refreshed state for column loads.
        compile_options = getattr(statement, "_compile_options", None)
        path = getattr(compile_options, "_current_path", None)
        if path is not None and not path.is_root:
            if note is not None:
                return _where_scoped(statement, note.with_deleted)
            return statement
        if getattr(compile_options, "_for_refresh_state", False):
            return statement
        if note is not None and note.root_pending:
            note.root_pending = False
            return statement  # Repository.get's primary-key load: get() checks the row
    with_deleted = bool(
        (execution_options and execution_options.get(WITH_DELETED))
        or statement._execution_options.get(WITH_DELETED)
    )
    maker = statement._execution_options.get(_SCOPED_BY)
    if isinstance(maker, ScopedStatement) and maker.made(statement, with_deleted=with_deleted):
        return statement  # scoped by ScopedStatement for this very scope
    mappers = _involved_mappers(statement)
    if not mappers:
        return statement
    criteria = criteria_options(mappers, current_context(), with_deleted=with_deleted)
    return statement.options(*criteria) if criteria else statement


def _scope(mappers: tuple[Mapper[Any], ...], with_deleted: bool) -> tuple[Any, ...]:
    # The arguments of _options (what the criteria depend on) in the current context.
    if not mappers:
        return ()  # nothing to scope, whatever the context
    ctx = current_context()
    return (scope_tenant(mappers, ctx), ctx.system, with_deleted)


class ScopedStatement:
    """A statement built once (a query plan) and scoped once per scope it runs in.

    :func:`scope_statement` would add the same criteria to it at every execution, making a
    new statement whose cache key SQLAlchemy computes again; here each scope's variant
    (tenant, system context, soft-deleted rows shown) is made once, by the same rule, and
    marked, so ``scope_statement`` passes it through when it is the variant made for the
    current scope - and scopes it again (failing closed) when it is not.

    With ``rows_of``, the statement reads that entity's rows and nothing else (no join, no
    subquery), and the entity's relationships all load in statements of their own
    (:func:`checks_rows_in_python`): a plain WHERE on the entity scopes it, far cheaper for
    SQLAlchemy per execution than loader criteria, and the relationship loads get theirs
    from ``RowsChecked`` (:attr:`checks_rows`), which the caller sets while it runs.

    Args:
        statement: an ORM SELECT, not scoped.
        rows_of: the mapper whose rows alone the statement reads, if so.
    """

    __slots__ = ("_mappers", "_statement", "_variants", "checks_rows")

    def __init__(self, statement: Any, *, rows_of: Mapper[Any] | None = None) -> None:
        self._statement = statement
        self._mappers = (rows_of,) if rows_of is not None else _involved_mappers(statement)
        self._variants: Bounded[tuple[Any, ...], Any] = Bounded(_VARIANTS)
        #: Whether relationship loads must be scoped by ``RowsChecked`` while it runs.
        self.checks_rows = rows_of is not None

    def scoped(self, *, with_deleted: bool) -> Any:
        """The statement scoped for the current context.

        Raises:
            TenantRequired: a tenant-scoped class is involved and the context has no tenant.
        """
        scope = _scope(self._mappers, with_deleted)
        return self._variants.get_or_make(scope, lambda: self._variant(scope))

    def _variant(self, scope: tuple[Any, ...]) -> Any:
        found = self._statement
        if self.checks_rows:
            clauses = _where(self._mappers, *scope) if scope else ()
            found = found.where(*clauses) if clauses else found
        else:
            criteria = _options(self._mappers, *scope) if scope else ()
            found = found.options(*criteria) if criteria else found
        return found.execution_options(**{_SCOPED_BY: self})

    def made(self, statement: Any, *, with_deleted: bool) -> bool:
        """Whether ``statement`` is this plan's variant for the current scope.

        Raises:
            TenantRequired: a tenant-scoped class is involved and the context has no tenant.
        """
        return self._variants.get(_scope(self._mappers, with_deleted)) is statement


def _involved_mappers(statement: Any) -> tuple[Mapper[Any], ...]:
    # Every scoped class the statement names or can reach through relationships; all scoped
    # classes when SQLAlchemy cannot name its entities (count/exists shapes).
    if statement.is_select:
        # What column_descriptions names, read from the selected elements themselves: an
        # entity or column carries its entity as "parententity", an expression over columns
        # (count(Item.id)) as its "plugin_subject". column_descriptions builds the ORM
        # compile state to answer, which cost a query about a sixth of its client CPU.
        involved = dict.fromkeys(
            entity.mapper
            for column in statement._raw_columns
            if (
                entity := column._annotations.get("parententity")
                or column._propagate_attrs.get("plugin_subject")
            )
            is not None
        )
    else:
        entity = sa_inspect(statement.entity_description["entity"], raiseerr=False)
        mapper = getattr(entity, "mapper", None)
        involved = {mapper: None} if mapper is not None else {}
    if not involved:
        mappers: tuple[Mapper[Any], ...] = all_scoped_mappers()
    else:
        mappers = ()
        for mapper in involved:
            closure = scoped_closure(mapper)
            if closure:
                mappers = closure if not mappers else tuple(dict.fromkeys(mappers + closure))
    if statement.is_select:
        named = from_clause_mappers(statement)
        if named:
            mappers = tuple(dict.fromkeys(mappers + named))
    return mappers


def _where_scoped(statement: Any, with_deleted: bool) -> Any:
    # A relationship load under RowsChecked selects the related class itself
    # (checks_rows_in_python admits no inheritance or aliasing shapes), so a plain WHERE on
    # that class scopes it; a joined-in parent alias was checked already. Loads it triggers
    # in turn come back here while the note is still set.
    subject = statement._propagate_attrs.get("plugin_subject")  # the loaded entity
    mapper = getattr(subject, "mapper", None)
    ctx = current_context()
    if mapper is not None and isinstance(statement, Select):
        clauses = loader_where((mapper,), ctx, with_deleted=with_deleted)
        return statement.where(*clauses) if clauses else statement
    # Not a shape SQLAlchemy's eager loads take today; fail closed all the same.
    mappers = (mapper,) if mapper is not None else all_scoped_mappers()  # pragma: no cover
    criteria = criteria_options(mappers, ctx, with_deleted=with_deleted)  # pragma: no cover
    return statement.options(*criteria) if criteria else statement  # pragma: no cover


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
