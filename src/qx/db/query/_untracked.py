"""Untracked reads: rows become instances of the mapped class that no unit of work tracks.

SQLAlchemy's loading gives each instance an ``InstanceState``, puts it in the identity map,
records its committed values and instruments its collections, so that a flush can find what
changed. A read that will not change what it reads (a list page, a query handler, a report)
needs none of that: :meth:`QuerySet.untracked` reads the entity's columns (one SELECT, scoped
like every statement of the session), builds each instance with ``object.__new__`` and fills
its ``__dict__``, then loads its parts the way ``selectin`` would (one SELECT per relationship
level, ``IN`` the parents' keys) and sets them as plain lists, sets, dicts or single objects.

A :class:`ReadPlan` per mapper (held by its ``MapperModel``, built at the first untracked read)
says which columns to select and which relationships to follow: those a tracked read loads
with every instance (the aggregate's owned parts, and any the mapping loads eagerly), others
when the query names them in ``load()``.

The instances are values: they are never flushed, and every read builds its own (within one
read, a row is one object). Where SQLAlchemy keeps an instance's state they hold a stand-in
(:class:`NotTracked`) that answers any use - assigning a mapped attribute, reading one that
was not read, adding the instance to a session - with a ``UnitOfWorkError`` saying so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Select, bindparam, select, tuple_
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.orm.properties import ColumnProperty

from qx.core._errors import InvalidQuery, UnitOfWorkError
from qx.db._dialect_base import Dialect
from qx.db._mapping import _load_plan, entity_info
from qx.db._model import LoadPlan, model_of

__all__ = ["NotTracked", "ReadPlan", "read_plan", "untracked_rows"]

#: Parent keys per relationship SELECT (as SQLAlchemy's selectin loading chunks them).
CHUNK: Final = 500
_PARENTS: Final = "qx_parents"
#: Loader strategies that read a relationship with its parent.
_EAGER: Final = frozenset({"selectin", "joined", "subquery", "immediate"})

#: Runs a statement with parameters; returns its rows.
Run = Callable[[Any, dict[str, Any] | None], Awaitable[Sequence[Any]]]


#: Where SQLAlchemy keeps an instance's state (``sqlalchemy.orm.base.DEFAULT_STATE_ATTR``).
_STATE: Final = "_sa_instance_state"


class NotTracked:
    """The stand-in for the SQLAlchemy state of the instances an untracked read builds.

    SQLAlchemy turns to an instance's state to set a mapped attribute, to read one missing
    from its ``__dict__``, or to add it to a session; for these instances each of those is a
    mistake, reported here by name instead of SQLAlchemy's ``AttributeError``.

    Args:
        cls: the mapped class.
    """

    __slots__ = ("cls",)

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and friends probing for protocols
            raise AttributeError(name)
        what = self.cls.__qualname__
        raise UnitOfWorkError(
            f"this {what} was read with untracked(): a value no unit of work tracks, so it "
            "cannot change, be added to a session, or read what was not read with it "
            f"(read the {what} without untracked() to change it; name relationships in load())"
        )


@dataclass(slots=True)
class Relation:
    """How one relationship's objects are read for a batch of parents.

    Attributes:
        key: the relationship's attribute on the parent.
        target: the related class's mapper.
        parent_keys: the parent's attributes whose values the related rows match.
        match: positions, in the target's selected columns, of the columns matched.
        remote: the target's attributes matched.
        order_by: the relationship's order.
        uselist: a collection (else one object or ``None``).
        collection: the collection class (``None``: a list).
    """

    key: str
    target: Mapper[Any]
    parent_keys: tuple[str, ...]
    match: tuple[int, ...]
    remote: tuple[Any, ...]
    order_by: tuple[Any, ...]
    uselist: bool
    collection: Any
    statements: dict[str, Select[Any]] = field(default_factory=dict)

    def statement(self, dialect: Dialect) -> Select[Any]:
        """The target's columns ``WHERE`` matched ``IN :qx_parents``, in the relationship's
        order (built once per backend: PostgreSQL binds the parents as one array)."""
        found = self.statements.get(dialect.name)
        if found is None:
            remote = self.remote
            where = (
                dialect.in_list(remote[0], _PARENTS)
                if len(remote) == 1
                else tuple_(*remote).in_(bindparam(_PARENTS, expanding=True))
            )
            found = select(*read_plan(self.target).columns).where(where).order_by(*self.order_by)
            self.statements[dialect.name] = found
        return found


@dataclass(slots=True)
class ReadPlan:
    """What an untracked read of one mapped class selects and builds.

    Attributes:
        cls: the mapped class.
        columns: the entity attributes selected, in order.
        keys: their attribute names, in the same order.
        pk: positions of the primary key among them.
        load: what ``__init__`` would have given a loaded instance (defaults, ``__post_init__``).
        eager: the relationships read with every instance: the aggregate's owned parts and
            the others the mapping loads eagerly, as a tracked read does.
        stand_in: what the instances hold where SQLAlchemy keeps an instance's state.
        relations: every relationship read so far, by key (built on first use).
    """

    mapper: Mapper[Any]
    cls: type[Any]
    columns: tuple[Any, ...]
    keys: tuple[str, ...]
    pk: tuple[int, ...]
    load: LoadPlan | None
    eager: tuple[str, ...]
    stand_in: NotTracked
    relations: dict[str, Relation] = field(default_factory=dict)

    def relation(self, key: str) -> Relation:
        found = self.relations.get(key)
        if found is None:
            found = self.relations[key] = _relation(self.mapper, key)
        return found


def read_plan(mapper: Mapper[Any]) -> ReadPlan:
    """The :class:`ReadPlan` of ``mapper`` (built once).

    Raises:
        InvalidQuery: a class mapped with inheritance (its rows' classes vary by row).
    """
    model = model_of(mapper)
    plan: ReadPlan | None = model.read_plan
    if plan is None:
        plan = model.read_plan = _plan(mapper)
    return plan


def _plan(mapper: Mapper[Any]) -> ReadPlan:
    cls = mapper.class_
    if mapper.inherits is not None or mapper.polymorphic_on is not None:
        raise InvalidQuery(
            f"untracked() cannot read {cls.__qualname__}: it is mapped with inheritance",
            field="untracked",
        )
    props = [
        prop
        for prop in mapper.column_attrs
        if isinstance(prop, ColumnProperty) and not prop.deferred
    ]
    keys = tuple(prop.key for prop in props)
    pk_keys = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
    return ReadPlan(
        mapper=mapper,
        cls=cls,
        columns=tuple(getattr(cls, key) for key in keys),
        keys=keys,
        pk=tuple(keys.index(key) for key in pk_keys),
        load=_load_plan(mapper),
        eager=tuple(
            dict.fromkeys(
                (
                    *entity_info(mapper).owned,
                    *(rel.key for rel in mapper.relationships if rel.lazy in _EAGER),
                )
            )
        ),
        stand_in=NotTracked(cls),
    )


def _relation(mapper: Mapper[Any], key: str) -> Relation:
    prop = mapper.relationships.get(key)
    name = f"{mapper.class_.__qualname__}.{key}"
    if not isinstance(prop, RelationshipProperty):
        raise InvalidQuery(f"{name} is not a relationship", field=key)
    if prop.secondary is not None:
        raise InvalidQuery(
            f"untracked() cannot read {name}: it goes through an association table; "
            "read it in a tracked query",
            field=key,
        )
    target = prop.mapper
    plan = read_plan(target)
    pairs = prop.local_remote_pairs or []
    parent_keys = tuple(mapper.get_property_by_column(local).key for local, _ in pairs)
    remote_keys = tuple(target.get_property_by_column(remote).key for _, remote in pairs)
    missing = [k for k in remote_keys if k not in plan.keys]
    if not pairs or missing:
        raise InvalidQuery(f"untracked() cannot read {name}: no column pairs it", field=key)
    return Relation(
        key=key,
        target=target,
        parent_keys=parent_keys,
        match=tuple(plan.keys.index(k) for k in remote_keys),
        remote=tuple(getattr(target.class_, k) for k in remote_keys),
        order_by=tuple(prop.order_by or ()),
        uselist=bool(prop.uselist),
        collection=prop.collection_class,
    )


async def untracked_rows(
    plan: ReadPlan, rows: Sequence[Any], run: Run, dialect: Dialect, paths: Iterable[str] = ()
) -> list[Any]:
    """Instances of ``plan``'s class built from ``rows`` (the plan's columns, in order), their
    parts and the relationships ``paths`` names (``"lines"``, ``"lines__product"``) loaded by
    ``run`` on ``dialect``'s backend.

    Raises:
        InvalidQuery: a relationship that cannot be read untracked.
    """
    built: dict[tuple[Any, ...], Any] = {}
    objects = _build(plan, rows, built)
    tree = _tree(paths)
    await _fill(plan, list(built.values()), run, dialect, tree, built)
    return objects


def _tree(paths: Iterable[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for key in path.split("__"):
            node = node.setdefault(key, {})
    return tree


def _build(plan: ReadPlan, rows: Sequence[Any], built: dict[tuple[Any, ...], Any]) -> list[Any]:
    new = object.__new__
    cls = plan.cls
    keys = plan.keys
    load = plan.load
    mapper = plan.mapper
    stand_in = plan.stand_in
    single = plan.pk[0] if len(plan.pk) == 1 else None
    out = []
    for row in rows:
        identity = (
            (mapper, row[single]) if single is not None else (mapper, *(row[i] for i in plan.pk))
        )
        obj = built.get(identity)
        if obj is None:
            obj = new(cls)
            given = obj.__dict__
            given.update(zip(keys, row, strict=True))
            given[_STATE] = stand_in
            if load is not None:
                load.apply(obj)  # column values set, relationships not yet: as on a load
            built[identity] = obj
        out.append(obj)
    return out


async def _fill(
    plan: ReadPlan,
    parents: list[Any],
    run: Run,
    dialect: Dialect,
    tree: dict[str, Any],
    built: dict[tuple[Any, ...], Any],
) -> None:
    if not parents:
        return
    for key in dict.fromkeys((*plan.eager, *tree)):
        relation = plan.relation(key)
        target = read_plan(relation.target)
        own = [p for p in parents if key not in p.__dict__]  # read before, in this read
        by_parent: dict[Any, list[Any]] = {}
        children: dict[int, Any] = {}
        values = _values(own, relation.parent_keys)
        statement = relation.statement(dialect)
        single = relation.match[0] if len(relation.match) == 1 else None
        for start in range(0, len(values), CHUNK):
            rows = await run(statement, {_PARENTS: values[start : start + CHUNK]})
            made = _build(target, rows, built)
            for row, child in zip(rows, made, strict=True):
                matched = (
                    row[single] if single is not None else tuple(row[i] for i in relation.match)
                )
                by_parent.setdefault(matched, []).append(child)
                children[id(child)] = child
        for parent in own:
            value = _value(parent, relation.parent_keys)
            found = by_parent.get(value, []) if value is not None else []
            parent.__dict__[key] = _collected(relation, found)
        await _fill(target, list(children.values()), run, dialect, tree.get(key, {}), built)


def _value(obj: Any, keys: tuple[str, ...]) -> Any:
    given = obj.__dict__
    if len(keys) == 1:
        return given.get(keys[0])
    value = tuple(given.get(k) for k in keys)
    return None if None in value else value


def _values(parents: list[Any], keys: tuple[str, ...]) -> list[Any]:
    values = dict.fromkeys(_value(p, keys) for p in parents)
    values.pop(None, None)
    return list(values)


def _collected(relation: Relation, found: list[Any]) -> Any:
    if not relation.uselist:
        return found[0] if found else None
    factory = relation.collection
    if factory is None or factory is list:
        return found
    if factory is set:
        return set(found)
    collection = factory()
    append = collection._sa_appender  # the collection's appender role (SQLAlchemy's)
    for item in found:
        append(item, _sa_initiator=False)  # no attribute events: nothing tracks it
    return collection
