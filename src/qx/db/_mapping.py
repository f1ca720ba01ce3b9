"""Imperative mapping of plain dataclasses onto SQLAlchemy tables, plus column helpers.

The domain stays free of ORM base classes and decorators; this module is the only place that
knows how an aggregate is stored. Column helpers tag their columns with a role in
``Column.info`` (tenant, soft delete, audit) so the session hooks and repositories find them
without naming conventions.

Example:
    >>> from dataclasses import dataclass, field
    >>> from uuid import UUID
    >>> from sqlalchemy import Column, String, Table
    >>> from qx.core import AggregateRoot, new_id
    >>> @dataclass(eq=False, kw_only=True)
    ... class Note(AggregateRoot):
    ...     id: UUID = field(default_factory=new_id)
    ...     text: str
    ...     version: int = 1
    >>> metadata = make_metadata()
    >>> notes = Table("notes", metadata, uuid_pk(), Column("text", String(100), nullable=False),
    ...               version_column(), *audit_columns(), soft_delete_column())
    >>> _ = map_aggregate(make_registry(metadata), Note, notes)
    >>> info = entity_info(Note)
    >>> (info.version_key, info.deleted_key, info.created_key)
    ('version', 'deleted_at', 'created_at')
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal
from weakref import WeakSet

from sqlalchemy import Column, Integer, MetaData, String, Table, Uuid, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper, RelationshipProperty, registry
from sqlalchemy.orm import configure_mappers as _configure_mappers
from sqlalchemy.orm.exc import UnmappedClassError
from sqlalchemy.orm.state import InstanceState

from qx.core._aggregate import AggregateRoot
from qx.core._clock import utcnow
from qx.core._errors import ConfigurationError
from qx.core._ids import new_id
from qx.db._model import EntityInfo, LoadPlan, Unset, model_of
from qx.db.types import PortableJSON, UtcDateTime

__all__ = [
    "NAMING_CONVENTION",
    "audit_columns",
    "entity_info",
    "json_column",
    "make_metadata",
    "make_registry",
    "map_aggregate",
    "map_entity",
    "soft_delete_column",
    "tenant_column",
    "uuid_pk",
    "version_column",
]

ROLE: Final = "qx_role"
TENANT: Final = "tenant"
DELETED_AT: Final = "deleted_at"
CREATED_AT: Final = "created_at"
UPDATED_AT: Final = "updated_at"

NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint and index names for ``MetaData``: deterministic, so migrations are stable."""


def make_metadata(*, schema: str | None = None) -> MetaData:
    """Return a ``MetaData`` with deterministic constraint names (stable migrations)."""
    return MetaData(schema=schema, naming_convention=NAMING_CONVENTION)


qx_metadata: Final = MetaData(naming_convention=NAMING_CONVENTION)
"""The metadata of qx's own tables (outbox, inbox, idempotency keys); each table is defined
by the package that owns it, and ``qx.outbox.include_qx_tables`` copies them all."""


def make_registry(metadata: MetaData | None = None) -> registry:
    """Return an ORM registry for imperative mapping on ``metadata``."""
    return registry(metadata=metadata if metadata is not None else make_metadata())


def uuid_pk(name: str = "id") -> Column[Any]:
    """A UUID primary key (native ``uuid`` on PostgreSQL) defaulting to a new UUIDv7."""
    return Column(name, Uuid(), primary_key=True, default=new_id)


def version_column(name: str = "version") -> Column[int]:
    """The optimistic-concurrency counter of an aggregate root."""
    return Column(name, Integer(), nullable=False, default=1)


def audit_columns() -> tuple[Column[Any], Column[Any]]:
    """``created_at`` / ``updated_at``: aware UTC timestamps maintained by qx at flush.

    The column defaults only cover Core inserts that bypass the ORM.
    """
    return (
        Column(CREATED_AT, UtcDateTime(), nullable=False, default=utcnow, info={ROLE: CREATED_AT}),
        Column(
            UPDATED_AT,
            UtcDateTime(),
            nullable=False,
            default=utcnow,
            onupdate=utcnow,
            info={ROLE: UPDATED_AT},
        ),
    )


def soft_delete_column(name: str = "deleted_at") -> Column[Any]:
    """A nullable ``deleted_at``: its presence makes ``remove()`` a soft delete."""
    return Column(name, UtcDateTime(), nullable=True, info={ROLE: DELETED_AT})


def tenant_column(name: str = "tenant_id", *, length: int = 64) -> Column[str]:
    """The tenant key: rows are visible only to the tenant in the request context."""
    return Column(name, String(length), nullable=False, index=True, info={ROLE: TENANT})


def json_column(name: str, *, nullable: bool = False, default: Any = None) -> Column[Any]:
    """A JSON column that is JSONB on PostgreSQL."""
    return Column(name, PortableJSON(), nullable=nullable, default=default)


def entity_info(cls_or_mapper: type[Any] | Mapper[Any]) -> EntityInfo:
    """Return the :class:`EntityInfo` of a mapped class (computed once per mapper).

    Raises:
        ConfigurationError: the class is not mapped.
    """
    if isinstance(cls_or_mapper, Mapper):
        mapper: Mapper[Any] = cls_or_mapper
    else:
        try:
            mapper = sa_inspect(cls_or_mapper)
        except (UnmappedClassError, NoInspectionAvailable) as exc:
            raise ConfigurationError(
                f"{getattr(cls_or_mapper, '__qualname__', cls_or_mapper)!r} is not mapped: "
                "call map_aggregate() or map_entity() first"
            ) from exc
        if not isinstance(mapper, Mapper):
            raise ConfigurationError(f"{cls_or_mapper!r} is not a mapped class")
    model = model_of(mapper)
    found = model.entity
    if found is None:
        found = model.entity = _build_info(mapper, root=model.root)
    return found


def _build_info(mapper: Mapper[Any], *, root: bool) -> EntityInfo:
    roles: dict[str, str] = {}
    for prop in mapper.column_attrs:
        for column in prop.columns:
            role = column.info.get(ROLE) if hasattr(column, "info") else None
            if role:
                roles[role] = prop.key
    version_key = None
    if mapper.version_id_col is not None:
        version_key = mapper.get_property_by_column(mapper.version_id_col).key
    owned = tuple(rel.key for rel in mapper.relationships if rel.cascade.delete_orphan)
    is_root = root or issubclass(mapper.class_, AggregateRoot)
    return EntityInfo(
        cls=mapper.class_,
        name=mapper.class_.__name__,
        is_root=is_root,
        pk_keys=tuple(mapper.get_property_by_column(col).key for col in mapper.primary_key),
        version_key=version_key,
        tenant_key=roles.get(TENANT),
        deleted_key=roles.get(DELETED_AT),
        created_key=roles.get(CREATED_AT),
        updated_key=roles.get(UPDATED_AT),
        owned=owned,
    )


def _prepare_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    prepared = dict(properties or {})
    for key, prop in prepared.items():
        if isinstance(prop, RelationshipProperty) and prop.lazy == "select":
            # Async sessions cannot lazy-load (MissingGreenlet). Parts of the aggregate load
            # with it in one extra SELECT; other links refuse implicit SQL with a clear error.
            prop.lazy = "selectin" if prop.cascade.delete_orphan else "raise_on_sql"
            prop.strategy_key = (("lazy", prop.lazy),)
        elif not isinstance(prop, RelationshipProperty | Column) and not hasattr(prop, "key"):
            raise ConfigurationError(f"property {key!r} is not a relationship or column: {prop!r}")
    return prepared


PostInit = Literal["run", "skip"]


def map_aggregate(
    reg: registry,
    cls: type[Any],
    table: Table,
    *,
    version: str | None = "version",
    properties: Mapping[str, Any] | None = None,
    post_init: PostInit | None = None,
    **mapper_kwargs: Any,
) -> Mapper[Any]:
    """Map an aggregate root class onto ``table`` with an optimistic-concurrency version.

    qx bumps the version itself (``version_id_generator=False``) once per transaction for any
    change inside the aggregate - its columns, its collections, its parts' columns and
    collections - so two writers changing different lines of one order conflict. If domain
    code changes the version itself, qx writes that value instead of bumping it again.

    Loaded instances get the defaults of their unmapped dataclass fields (SQLAlchemy does not
    call ``__init__`` when it loads a row).

    Args:
        reg: the registry from :func:`make_registry`.
        cls: the aggregate root class (a plain dataclass).
        table: its table.
        version: the version column's name, or ``None`` for an unversioned aggregate.
        properties: extra mapper properties, typically ``relationship()`` to child entities;
            owned children (``cascade="all, delete-orphan"``) load eagerly with the root.
        post_init: required when the class defines ``__post_init__``: ``"run"`` calls it on
            every loaded instance (after the column values are set, before relationships
            load; what it assigns counts as loaded state, and it may not record events),
            ``"skip"`` never calls it for loaded instances.
        **mapper_kwargs: passed to ``registry.map_imperatively``.

    Raises:
        ConfigurationError: the version column is not in the table, or ``post_init`` is
            missing for a class with ``__post_init__``.
    """
    if not isinstance(cls, type):
        raise ConfigurationError(f"map_aggregate expects a class, got {cls!r}")
    if version is not None:
        if version not in table.c:
            raise ConfigurationError(
                f"table {table.name!r} has no version column {version!r} for {cls.__qualname__}; "
                "add version_column() or pass version=None"
            )
        mapper_kwargs.setdefault("version_id_col", table.c[version])
        mapper_kwargs.setdefault("version_id_generator", False)
    mapper = _map(reg, cls, table, properties, post_init, mapper_kwargs)
    # The identity map holds unmodified objects weakly: a qx session's transaction holds
    # every loaded root (subclasses mapped by inheritance too) until it ends (_identity,
    # holds_loaded).
    model_of(mapper).root = True
    return mapper


def map_entity(
    reg: registry,
    cls: type[Any],
    table: Table,
    *,
    properties: Mapping[str, Any] | None = None,
    post_init: PostInit | None = None,
    **mapper_kwargs: Any,
) -> Mapper[Any]:
    """Map a non-root entity (a part of an aggregate, or a plain read model).

    ``post_init`` as in :func:`map_aggregate`.
    """
    if not isinstance(cls, type):
        raise ConfigurationError(f"map_entity expects a class, got {cls!r}")
    # An AggregateRoot mapped here is held like a root all the same (holds_loaded): its
    # events must not be lost.
    return _map(reg, cls, table, properties, post_init, mapper_kwargs)


def _map(
    reg: registry,
    cls: type[Any],
    table: Table,
    properties: Mapping[str, Any] | None,
    post_init: PostInit | None,
    mapper_kwargs: dict[str, Any],
) -> Mapper[Any]:
    if post_init not in (None, "run", "skip"):
        raise ConfigurationError(f"post_init must be 'run' or 'skip', got {post_init!r}")
    params = getattr(cls, "__dataclass_params__", None)
    if params is not None and params.frozen:
        # SQLAlchemy keeps its state on the instance and qx changes versions in place: a
        # frozen instance refuses both, at the first __init__.
        raise ConfigurationError(
            f"{cls.__qualname__} is a frozen dataclass; mapped classes change in place "
            "(state, versions, loaded values): declare it @dataclass(frozen=False) and keep "
            "immutability for its value objects (map those as composites or JSON columns)"
        )
    defines_post_init = dataclasses.is_dataclass(cls) and hasattr(cls, "__post_init__")
    if defines_post_init and post_init is None:
        raise ConfigurationError(
            f"{cls.__qualname__} defines __post_init__, which SQLAlchemy never calls for "
            "loaded rows: pass post_init='run' (qx calls it on each loaded instance, column "
            "values set, relationships not yet loaded) or post_init='skip' to map_aggregate()/"
            "map_entity()"
        )
    mapper = reg.map_imperatively(
        cls, table, properties=_prepare_properties(properties), **mapper_kwargs
    )
    if dataclasses.is_dataclass(cls):
        run_post_init = defines_post_init and post_init == "run"
        model_of(mapper).post_init = run_post_init
        if run_post_init or _may_have_unmapped_fields(cls, table, properties, mapper_kwargs):
            event.listen(mapper, "load", _apply_load_defaults, raw=True)
    _remember(reg)
    return mapper


def _may_have_unmapped_fields(
    cls: type[Any],
    table: Table,
    properties: Mapping[str, Any] | None,
    mapper_kwargs: Mapping[str, Any],
) -> bool:
    # A cheap over-estimate made at mapping time, so most classes pay no load listener: the
    # exact set is known at the first load (see _load_plan).
    if any(k in mapper_kwargs for k in ("include_properties", "exclude_properties")):
        return True
    if "column_prefix" in mapper_kwargs:
        return True
    named = set(table.c.keys()) | set(properties or ())
    return any(f.name not in named for f in dataclasses.fields(cls))


def _load_plan(mapper: Mapper[Any]) -> LoadPlan | None:
    model = model_of(mapper)
    if not isinstance(model.load_plan, Unset):
        return model.load_plan
    cls = mapper.class_
    # Known only now, at the first load: backrefs of other mappers add attributes late.
    mapped = set(mapper.all_orm_descriptors.keys()) | set(mapper.attrs.keys())
    values: list[tuple[str, Any]] = []
    factories: list[tuple[str, Callable[[], Any]]] = []
    for f in dataclasses.fields(cls):
        if f.name in mapped:
            continue
        if f.default is not dataclasses.MISSING:
            values.append((f.name, f.default))
        elif f.default_factory is not dataclasses.MISSING:
            factories.append((f.name, f.default_factory))
        else:
            raise ConfigurationError(
                f"{cls.__qualname__}.{f.name} has no default and is not mapped to a column or "
                "relationship, so a loaded instance cannot have it: map it, or give it a "
                "default or default_factory"
            )
    post_init = None
    init_vars: list[Any] = []
    if model.post_init:
        post_init = cls.__post_init__
        regular = {f.name for f in dataclasses.fields(cls)}
        for pseudo in cls.__dataclass_fields__.values():
            # fields() leaves out InitVar and ClassVar pseudo-fields; a ClassVar has no
            # parameter in __init__, so it is not passed to __post_init__ either.
            if pseudo.name in regular or _is_class_var(pseudo):
                continue
            if pseudo.default is not dataclasses.MISSING:
                init_vars.append(pseudo.default)
            elif pseudo.default_factory is not dataclasses.MISSING:
                init_vars.append(pseudo.default_factory())
            else:
                raise ConfigurationError(
                    f"{cls.__qualname__}.__post_init__ takes the InitVar {pseudo.name!r}, which "
                    "has no default: qx cannot call it on loaded instances (use post_init='skip')"
                )
    plan = None
    if values or factories or post_init is not None:
        plan = LoadPlan(tuple(values), tuple(factories), post_init, tuple(init_vars))
    model.load_plan = plan
    return plan


def _is_class_var(pseudo: dataclasses.Field[Any]) -> bool:
    annotation = pseudo.type
    if isinstance(annotation, str):
        return annotation.startswith(("ClassVar", "typing.ClassVar"))
    return typing.get_origin(annotation) is typing.ClassVar or annotation is typing.ClassVar


def _apply_load_defaults(state: InstanceState[Any], _context: Any) -> None:
    plan = _load_plan(state.mapper)
    if plan is not None:
        plan.apply(state.obj())


# Registries that qx's mapping helpers were used with; filled by user code, never at import.
_registries: WeakSet[registry] = WeakSet()


def _remember(reg: registry) -> None:
    _registries.add(reg)


def known_registries() -> tuple[registry, ...]:
    """The registries qx's mapping helpers mapped classes into (scoping guards them all)."""
    return tuple(_registries)


def configure_mappers() -> None:
    """Configure every mapping now, turning SQLAlchemy's errors into ``ConfigurationError``."""
    try:
        _configure_mappers()
    except Exception as exc:
        raise ConfigurationError(f"mapping configuration failed: {exc}") from exc
