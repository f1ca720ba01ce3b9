"""``MapperModel``: what qx knows about one mapped class, typed, one object per mapper.

The model and the shapes it holds are defined here; each part is computed once, on first
use, by the module whose rule it is (the first use comes after mapper configuration, when
relationships and backrefs are final): the class's roles (:class:`EntityInfo`, from
``_mapping``), how a loaded instance gets its unmapped fields (:class:`LoadPlan`,
``_mapping``), the insert plan (:class:`InsertPlan`, ``_insert_new``), the update plan
(:class:`UpdatePlan`, ``_updates``), the scoped mappers it reaches, how its primary-key loads
are checked and the part they join (:class:`JoinedPart`, ``_scoping``), and whether its
objects are parts of an aggregate (``_session``). The model lives in the class manager's
``info`` dict, SQLAlchemy's place for extension data about a mapped class: it goes with a
discarded mapping and is one dict lookup away from any mapper, instance state or class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from weakref import WeakKeyDictionary

from sqlalchemy import Column, Table, and_, bindparam, update
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.interfaces import ORMOption

from qx.core._aggregate import AggregateRoot
from qx.core._errors import ConfigurationError
from qx.db._transaction import watch_keys
from qx.db._writes import WriteStatement

__all__ = [
    "MODEL_KEY",
    "OLD_VERSION",
    "UNSET",
    "EntityInfo",
    "InsertPlan",
    "JoinedPart",
    "LoadPlan",
    "MapperModel",
    "Unset",
    "UpdatePlan",
    "holds_loaded",
    "model_of",
]

MODEL_KEY: Final = "qx"
#: The bound parameter of the loaded version in :class:`UpdatePlan` statements.
OLD_VERSION: Final = "qx_loaded_version"


class Unset:
    """The type of :data:`UNSET`: a part of the model not computed yet (where ``None`` is a
    computed answer)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()
"""A part of a :class:`MapperModel` not computed yet."""


@dataclass(frozen=True, slots=True)
class EntityInfo:
    """What qx knows about a mapped class: its roles and its place in an aggregate.

    Attributes:
        cls: the mapped class.
        name: the class name used in messages and outbox rows.
        is_root: whether it is an aggregate root (versioned, owns events).
        pk_keys: attribute names of the primary key.
        version_key: attribute of the optimistic-concurrency counter, if any.
        tenant_key: attribute of the tenant column, if any.
        deleted_key: attribute of the soft-delete column, if any.
        created_key: attribute of ``created_at``, if any.
        updated_key: attribute of ``updated_at``, if any.
        owned: relationship keys whose targets belong to the aggregate (delete-orphan).
    """

    cls: type[Any]
    name: str
    is_root: bool
    pk_keys: tuple[str, ...]
    version_key: str | None
    tenant_key: str | None
    deleted_key: str | None
    created_key: str | None
    updated_key: str | None
    owned: tuple[str, ...]

    def identity(self, obj: Any) -> str:
        """Return the primary key of ``obj`` as a string (composite keys joined by ``:``)."""
        return ":".join(str(getattr(obj, key)) for key in self.pk_keys)

    def describe(self, obj: Any) -> str:
        """Return ``Name(id)`` for messages."""
        return f"{self.name}({self.identity(obj)})"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What a loaded instance of a dataclass needs that ``__init__`` would have given it."""

    values: tuple[tuple[str, Any], ...]
    factories: tuple[tuple[str, Callable[[], Any]], ...]
    post_init: Callable[..., None] | None
    init_vars: tuple[Any, ...]

    def apply(self, obj: Any) -> None:
        given = obj.__dict__
        for name, value in self.values:
            if name not in given:
                given[name] = value  # dataclasses refuse mutable plain defaults: safe to share
        for name, factory in self.factories:
            if name not in given:
                given[name] = factory()
        if self.post_init is not None:
            had_events = isinstance(obj, AggregateRoot) and obj.has_pending_events()
            self.post_init(obj, *self.init_vars)
            if not had_events and isinstance(obj, AggregateRoot) and obj.has_pending_events():
                obj.collect_events()
                raise ConfigurationError(
                    f"{type(obj).__qualname__}.__post_init__ recorded events while a stored "
                    "row was loaded; record creation events in a factory method instead"
                )


@dataclass(frozen=True, slots=True)
class InsertPlan:
    table: Table
    #: ``insert(table)``, built once (see ``qx.db._writes.WriteStatement``)
    statement: WriteStatement
    #: (attribute key, column key, column has a default or server default)
    columns: tuple[tuple[str, str, bool], ...]
    #: (relationship key, ((parent attribute, child attribute), ...)) for owned collections
    owned: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    #: other relationships: they must be empty for the fast path
    links: tuple[str, ...]
    #: attribute keys of the primary key
    pk: tuple[str, ...]
    #: (attribute key, column) of a primary key the database generates (an autoincrement
    #: integer) when the object leaves it ``None``; read back by ``RETURNING``
    generated: tuple[str, Column[Any]] | None = None


@dataclass(slots=True)
class UpdatePlan:
    """How qx writes a changed row (a root's or a part's): its columns, and one UPDATE per
    set of them.

    Attributes:
        table: the mapped table.
        columns: attribute key -> (position, column) of every column qx may write.
        refreshed: positions of the columns with an ``onupdate`` default (SQLAlchemy would
            fill them in when an UPDATE leaves them out).
        quiet: relationship keys whose changes write no column of the row.
        pk: the primary-key columns, in identity order.
        version: the version column, if any.
    """

    table: Table
    columns: dict[str, tuple[int, Column[Any]]]
    refreshed: frozenset[int]
    quiet: frozenset[str]
    pk: tuple[Column[Any], ...]
    version: Column[Any] | None
    #: the bound parameter of each column's new value, by position
    set_names: tuple[str, ...] = ()
    #: the bound parameter of each primary-key column, in identity order
    key_names: tuple[str, ...] = ()
    #: ``UPDATE`` statements by the positions of the columns they set
    statements: dict[tuple[int, ...], WriteStatement] = field(default_factory=dict)

    def statement(self, positions: tuple[int, ...]) -> WriteStatement:
        """The UPDATE setting the columns at ``positions`` (built once per set)."""
        found = self.statements.get(positions)
        if found is None:
            by_position = dict(self.columns.values())
            where = [
                column == bindparam(name, type_=column.type)
                for name, column in zip(self.key_names, self.pk, strict=True)
            ]
            if self.version is not None:
                where.append(self.version == bindparam(OLD_VERSION, type_=self.version.type))
            statement = (
                update(self.table)
                .where(and_(*where))
                .values(
                    {
                        by_position[p]: bindparam(self.set_names[p], type_=by_position[p].type)
                        for p in positions
                    }
                )
            )
            found = self.statements[positions] = WriteStatement(statement)
        return found


class JoinedPart:
    """The owned relationship ``Repository.get`` reads inside the root's own statement.

    One LEFT OUTER JOIN instead of a second ORM statement: about a third less CPU for a
    primary-key load of a root with a small collection of parts, and one round trip less.
    The part rows carry no criteria in SQL, so ``visible_parts`` checks them in Python
    afterwards, exactly as ``visible`` checks the root.

    Attributes:
        key: the relationship's attribute name on the root.
        options: the loader option to pass to ``Session.get`` (built once, so SQLAlchemy's
            statement cache keeps hitting).
        info: the part class's :class:`EntityInfo`.
        uselist: whether the relationship is a collection.
    """

    __slots__ = ("info", "key", "options", "uselist")

    def __init__(
        self, *, key: str, options: tuple[ORMOption, ...], info: EntityInfo, uselist: bool
    ) -> None:
        self.key = key
        self.options = options
        self.info = info
        self.uselist = uselist


class MapperModel:
    """What qx knows about one mapped class.

    Attributes:
        mapper: the mapper.
        root: mapped with ``map_aggregate`` (an aggregate root).
        held: whether a transaction holds its loaded instances (a root, a class mapped by
            inheritance from one, or an ``AggregateRoot``); ``None``: not worked out yet.
        post_init: loaded instances get ``__post_init__`` called.
        entity: the class's roles, once computed.
        load_plan: what a loaded instance needs that ``__init__`` would have given it
            (``None``: nothing).
        read_plan: what an untracked read selects and builds (``qx.db.query._untracked``;
            ``None``: not built yet).
        insert_plan: how new instances are inserted without the flush (``None``: they
            cannot be).
        update_plan: how qx writes a changed row without the flush (``None``: the flush
            does).
        scope_closure: the tenant-scoped or soft-deletable mappers reachable from it.
        rows_checked: whether its primary-key loads may check rows in Python.
        joined_part: the owned relationship its primary-key load joins (``None``: none).
        in_aggregate: whether its objects are parts of an aggregate.
        repositories: what each repository class of the mapped class resolved about it
            (its query spec, its primary-key load), weakly keyed by the repository class: it
            goes with the mapping, so a class mapped again never meets a stale one.
    """

    __slots__ = (
        "entity",
        "held",
        "in_aggregate",
        "insert_plan",
        "joined_part",
        "load_plan",
        "mapper",
        "post_init",
        "read_plan",
        "repositories",
        "root",
        "rows_checked",
        "scope_closure",
        "update_plan",
    )

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.mapper = mapper
        self.root = False
        self.held: bool | None = None
        self.post_init = False
        self.entity: EntityInfo | None = None
        self.load_plan: LoadPlan | Unset | None = UNSET
        self.read_plan: Any = None
        self.insert_plan: InsertPlan | Unset | None = UNSET
        self.update_plan: UpdatePlan | Unset | None = UNSET
        self.scope_closure: tuple[Mapper[Any], ...] | None = None
        self.rows_checked: bool | None = None
        self.joined_part: JoinedPart | Unset | None = UNSET
        self.in_aggregate: bool | None = None
        self.repositories: WeakKeyDictionary[type, Any] = WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"MapperModel({self.mapper.class_.__qualname__})"


def model_of(mapper: Mapper[Any]) -> MapperModel:
    """The :class:`MapperModel` of ``mapper`` (made on first use)."""
    info = mapper.class_manager.info
    model: MapperModel | None = info.get(MODEL_KEY)
    if model is None:
        model = info[MODEL_KEY] = MapperModel(mapper)
        watch_keys(mapper)
    return model


def holds_loaded(mapper: Mapper[Any]) -> bool:
    """Whether a transaction holds the instances of ``mapper`` it loads (cached per mapper):
    aggregate roots, whose recorded events must outlive the application's references."""
    model = model_of(mapper)
    if model.held is None:
        model.held = issubclass(mapper.class_, AggregateRoot) or any(
            model_of(m).root for m in mapper.iterate_to_root()
        )
    return model.held
