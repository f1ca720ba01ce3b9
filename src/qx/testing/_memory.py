"""An in-memory stand-in for the database: repositories and units of work with qx's rules.

``InMemoryStore`` keeps committed aggregates as snapshots (column values and owned parts, no
ORM state). Each ``InMemoryUnitOfWork`` loads fresh objects from those snapshots, so a
rolled-back unit of work leaves nothing behind, and writes them back at commit — checking
versions (``ConcurrencyConflict``), stamping tenant and audit columns, dispatching domain
events in rounds and recording integration events as outbox rows, exactly like the SQL unit
of work. Filters use the same lookups, evaluated in Python (:func:`qx.db.query.evaluate`).

Example:
    >>> store = InMemoryStore()
    >>> factory = InMemoryUnitOfWorkFactory(OrdersUnitOfWork, store)   # doctest: +SKIP
    >>> async with factory() as uow:                                    # doctest: +SKIP
    ...     await uow.orders.add(order)
    ...     await uow.commit()
    >>> [row["event_name"] for row in store.outbox]                     # doctest: +SKIP
    ['orders.order_placed']
"""

from __future__ import annotations

import builtins
import copy
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.interfaces import MANYTOONE

from qx.core._aggregate import AggregateRoot, RecordedEvent, make_record
from qx.core._clock import Clock, SystemClock
from qx.core._context import current_context
from qx.core._dispatch import EventDispatcher
from qx.core._errors import (
    ConcurrencyConflict,
    ConfigurationError,
    DuplicateKey,
    InvalidCursor,
    InvalidQuery,
    NotFound,
    TenantViolation,
    UnitOfWorkError,
)
from qx.core._events import Event
from qx.core._ids import new_id
from qx.db._mapping import EntityInfo, entity_info
from qx.db._repository import Repository
from qx.db._scoping import tenant_for_write, visible
from qx.db._uow import UnitOfWork, UnitOfWorkState, build_outbox_rows, dispatch_round
from qx.db.query._compiler import check, evaluate
from qx.db.query._keyset import resolve_sort
from qx.db.query._page import Page
from qx.db.query._q import Q

__all__ = [
    "InMemoryQuery",
    "InMemoryRepository",
    "InMemoryStore",
    "InMemoryUnitOfWork",
    "InMemoryUnitOfWorkFactory",
]

T = TypeVar("T")
U = TypeVar("U", bound="InMemoryUnitOfWork")


@dataclass(frozen=True)
class _Ref:
    """A link to another aggregate or entity, stored by class and identity (like an FK)."""

    cls: type[Any]
    key: str


def _links(mapper: Mapper[Any], info: EntityInfo) -> list[Any]:
    return [rel for rel in mapper.relationships if rel.key not in info.owned]


def _ref(value: Any) -> _Ref:
    return _Ref(type(value), entity_info(type(value)).identity(value))


def _snapshot(obj: Any) -> dict[str, Any]:
    mapper: Mapper[Any] = sa_inspect(type(obj))
    info = entity_info(mapper)
    state = sa_inspect(obj)
    for rel in _links(mapper, info):
        target = state.dict.get(rel.key)
        if rel.direction is MANYTOONE and target is not None:
            # What the flush's foreign-key sync would do: copy the target's key over.
            for local, remote in rel.local_remote_pairs:
                local_key = mapper.get_property_by_column(local).key
                remote_key = rel.mapper.get_property_by_column(remote).key
                setattr(obj, local_key, getattr(target, remote_key))
    data: dict[str, Any] = {
        prop.key: copy.deepcopy(getattr(obj, prop.key)) for prop in mapper.column_attrs
    }
    for key in info.owned:
        value = getattr(obj, key)
        if isinstance(value, list):
            data[key] = [(type(child), _snapshot(child)) for child in value]
        elif value is not None:
            data[key] = (type(value), _snapshot(value))
        else:
            data[key] = None
    for rel in _links(mapper, info):
        if rel.key not in state.dict:
            continue
        value = state.dict[rel.key]
        if isinstance(value, list):
            data[rel.key] = [_ref(item) for item in value]
        else:
            data[rel.key] = None if value is None else _ref(value)
    return data


def _restore(cls: type[Any], data: Mapping[str, Any], resolve: Any) -> Any:
    mapper: Mapper[Any] = sa_inspect(cls)
    obj = mapper.class_manager.new_instance()
    info = entity_info(mapper)
    for key, value in data.items():
        if key in info.owned:
            if isinstance(value, list):
                value = [_restore(child_cls, child, resolve) for child_cls, child in value]
            elif value is not None:
                value = _restore(value[0], value[1], resolve)
        elif isinstance(value, _Ref):
            value = resolve(value)
        elif isinstance(value, list) and value and isinstance(value[0], _Ref):
            value = [resolve(ref) for ref in value]
        else:
            value = copy.deepcopy(value)
        setattr(obj, key, value)
    return obj


@dataclass
class InMemoryStore:
    """Committed state shared by in-memory units of work.

    Attributes:
        outbox: the outbox rows written by commits, in order (with ``position``).
        published: envelopes a relay would have published (for tests that need them).
    """

    rows: dict[type[Any], dict[Any, dict[str, Any]]] = field(default_factory=dict)
    outbox: list[dict[str, Any]] = field(default_factory=list)

    def table(self, cls: type[Any]) -> dict[Any, dict[str, Any]]:
        return self.rows.setdefault(cls, {})


class InMemoryQuery(Generic[T]):
    """The query API over in-memory rows (same builders, terminals and errors)."""

    def __init__(self, repo: InMemoryRepository[T], qs: tuple[Q, ...] = (), **state: Any) -> None:
        self._repo = repo
        self._qs = qs
        self._order: tuple[Any, ...] | None = state.get("order")
        self._limit: int | None = state.get("limit")
        self._offset: int = state.get("offset", 0)
        self._with_deleted: bool = state.get("with_deleted", False)

    def _copy(self, **changes: Any) -> InMemoryQuery[T]:
        state = {
            "order": self._order,
            "limit": self._limit,
            "offset": self._offset,
            "with_deleted": self._with_deleted,
        }
        qs = changes.pop("qs", self._qs)
        state.update(changes)
        return InMemoryQuery(self._repo, qs, **state)

    def filter(self, *conditions: Q, **lookups: Any) -> InMemoryQuery[T]:
        q = Q(*conditions, **lookups)
        self._repo._check(q)
        return self._copy(qs=(*self._qs, q)) if q else self

    def exclude(self, *conditions: Q, **lookups: Any) -> InMemoryQuery[T]:
        q = Q(*conditions, **lookups)
        self._repo._check(q)
        return self._copy(qs=(*self._qs, ~q)) if q else self

    def order_by(self, *keys: str) -> InMemoryQuery[T]:
        if not keys:
            return self._copy(order=None)
        spec = [part for key in keys for part in key.split(",")]
        return self._copy(order=self._repo._sort_keys(spec))

    def limit(self, count: int | None) -> InMemoryQuery[T]:
        if count is not None and (not isinstance(count, int) or count < 0):
            raise InvalidQuery(
                f"limit must be a non-negative integer, got {count!r}", field="limit"
            )
        if count is not None and count > self._repo.max_limit:
            raise InvalidQuery(f"limit must be at most {self._repo.max_limit}", field="limit")
        return self._copy(limit=count)

    def offset(self, count: int) -> InMemoryQuery[T]:
        if not isinstance(count, int) or count < 0:
            raise InvalidQuery(
                f"offset must be a non-negative integer, got {count!r}", field="offset"
            )
        return self._copy(offset=count)

    def with_deleted(self, flag: bool = True) -> InMemoryQuery[T]:
        return self._copy(with_deleted=flag)

    def distinct(self, flag: bool = True) -> InMemoryQuery[T]:
        return self

    def load(self, *paths: str) -> InMemoryQuery[T]:
        return self  # everything is in memory already

    def _rows(self) -> builtins.list[T]:
        repo = self._repo
        found = [
            obj
            for obj in repo._visible(with_deleted=self._with_deleted)
            if all(evaluate(q, obj, repo._mapper) for q in self._qs)
        ]
        keys = self._order if self._order is not None else repo._default_sort()
        for key in reversed(keys):
            # NULL sorts as the largest value, as in SQL (qx's keyset convention).
            found.sort(key=_sorter(key.key), reverse=key.desc)
        found = found[self._offset :]
        return found if self._limit is None else found[: self._limit]

    async def all(self) -> builtins.list[T]:
        return self._rows()

    async def first(self) -> T | None:
        rows = self._rows()
        return rows[0] if rows else None

    async def one(self) -> T:
        rows = self._rows()
        if not rows:
            raise NotFound(entity=self._repo._info.name, key=" & ".join(map(repr, self._qs)))
        if len(rows) > 1:
            raise InvalidQuery(f"more than one {self._repo._info.name} matches")
        return rows[0]

    async def count(self) -> int:
        return len(self._rows())

    async def exists(self) -> bool:
        return bool(self._rows())

    async def values_list(self, *fields: str, flat: bool = False) -> builtins.list[Any]:
        if flat and len(fields) != 1:
            raise InvalidQuery("flat=True needs exactly one field", field="fields")
        rows = [tuple(_path_value(obj, name) for name in fields) for obj in self._rows()]
        return [row[0] for row in rows] if flat else rows

    async def stream(self, *, chunk_size: int = 1000) -> AsyncIterator[T]:
        for obj in self._rows():
            yield obj

    async def page(
        self, *, page_size: int = 50, cursor: str | None = None, page_number: int | None = None
    ) -> Page[T]:
        rows = self._rows()
        start = 0
        if cursor is not None:
            try:
                start = int(cursor)
            except ValueError:
                raise InvalidCursor("invalid cursor", field="cursor") from None
        if page_number is not None:
            start = (page_number - 1) * page_size
        items = rows[start : start + page_size]
        has_next = start + page_size < len(rows)
        return Page(
            items=items,
            page_size=page_size,
            has_next=has_next,
            has_previous=start > 0,
            next_cursor=str(start + page_size) if has_next else None,
            prev_cursor=str(max(start - page_size, 0)) if start > 0 else None,
            page_number=page_number,
        )

    async def update(self, **values: Any) -> int:
        rows = self._rows()
        for obj in rows:
            for key, value in values.items():
                setattr(obj, key, value)
        return len(rows)

    async def delete(self) -> int:
        rows = self._rows()
        for obj in rows:
            await self._repo.remove(obj)
        return len(rows)


def _sorter(attribute: str) -> Any:
    def key(obj: Any) -> tuple[int, Any]:
        value = getattr(obj, attribute)
        return (1, 0) if value is None else (0, value)

    return key


def _path_value(obj: Any, path: str) -> Any:
    for part in path.split("__"):
        if obj is None:
            return None
        obj = getattr(obj, part)
    return obj


class InMemoryRepository(Repository[T]):
    """A repository over an :class:`InMemoryStore`, for domain tests without a database.

    Subclass it like a :class:`~qx.db.Repository` (``filterable``, ``sortable``) or let
    :class:`InMemoryUnitOfWork` derive one from the SQL repository it replaces.
    """

    def __init__(self, uow: InMemoryUnitOfWork, sql_type: type[Repository[Any]]) -> None:
        self._uow_mem = uow
        self._sql_type = sql_type
        self.entity = sql_type.entity  # type: ignore[misc]
        self.filterable = sql_type.filterable  # type: ignore[misc]
        self.sortable = sql_type.sortable  # type: ignore[misc]
        self.default_order = sql_type.default_order  # type: ignore[misc]
        self.max_limit = sql_type.max_limit  # type: ignore[misc]
        self._mapper = sa_inspect(self.entity)
        self._info: EntityInfo = entity_info(self._mapper)
        self._name = sql_type.__qualname__

    # -- helpers ----------------------------------------------------------------------------

    def _check(self, q: Q) -> None:
        for key, value in q.leaves():
            check(self._mapper, key, value, allowed=self.filterable, owner=self._name)

    def _default_sort(self) -> tuple[Any, ...]:
        # Not the base class's per-class cache: one InMemoryRepository class serves every
        # entity.
        allowed = [key.lstrip("+-") for key in self.default_order]
        return resolve_sort(
            self._mapper, list(self.default_order), allowed=allowed, owner=self._name
        )

    def _visible(self, *, with_deleted: bool) -> builtins.list[T]:
        ctx = current_context()
        return [
            obj
            for obj in self._uow_mem._all(self.entity)
            if visible(self._info, obj, ctx, with_deleted=with_deleted)
        ]

    # -- the repository API -----------------------------------------------------------------

    def query(self) -> InMemoryQuery[T]:  # type: ignore[override]
        self._uow_mem._require_active()
        return InMemoryQuery(self)

    async def get(self, ident: Any, *, with_deleted: bool = False) -> T | None:
        for obj in self._visible(with_deleted=with_deleted):
            if self._info.identity(obj) == str(ident):
                return obj
        return None

    async def require(self, ident: Any, *, with_deleted: bool = False) -> T:
        found = await self.get(ident, with_deleted=with_deleted)
        if found is None:
            raise NotFound(entity=self._info.name, key=ident)
        return found

    async def list(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        sort: str | Sequence[str] | None = None,
        order_by: str | Sequence[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
        with_deleted: bool = False,
        **lookups: Any,
    ) -> builtins.list[T]:
        query = self.query().filter(**{**(filters or {}), **lookups}).with_deleted(with_deleted)
        spec = sort if sort is not None else order_by
        if spec is not None:
            query = query._copy(order=self._sort_keys(spec))
        if limit is not None:
            query = query.limit(limit)
        if offset:
            query = query.offset(offset)
        return await query.all()

    async def count(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        with_deleted: bool = False,
        **lookups: Any,
    ) -> int:
        return (
            await self.query()
            .filter(**{**(filters or {}), **lookups})
            .with_deleted(with_deleted)
            .count()
        )

    async def exists(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        with_deleted: bool = False,
        **lookups: Any,
    ) -> bool:
        return (
            await self.query()
            .filter(**{**(filters or {}), **lookups})
            .with_deleted(with_deleted)
            .exists()
        )

    async def add(self, entity: T) -> T:
        self._uow_mem._require_active()
        if not isinstance(entity, self.entity):
            raise InvalidQuery(
                f"{self._name} stores {self._info.name}, got {type(entity).__qualname__}"
            )
        key = self._info.tenant_key
        if key is not None and getattr(entity, key) is None:
            setattr(entity, key, tenant_for_write(self._info, current_context()))
        self._uow_mem._new.append(entity)
        return entity

    async def add_many(self, entities: Iterable[T]) -> builtins.list[T]:
        added = builtins.list(entities)
        for entity in added:
            await self.add(entity)
        return added

    async def remove(self, entity: T) -> None:
        key = self._info.deleted_key
        if key is None:
            await self.hard_remove(entity)
        elif getattr(entity, key) is None:
            setattr(entity, key, self._uow_mem._clock.now())

    async def hard_remove(self, entity: T) -> None:
        self._uow_mem._deleted.append(entity)

    async def in_bulk(self, ids: Iterable[Any], *, with_deleted: bool = False) -> dict[Any, T]:
        wanted = {str(i) for i in ids}
        pk = self._info.pk_keys[0]
        return {
            getattr(obj, pk): obj
            for obj in self._visible(with_deleted=with_deleted)
            if self._info.identity(obj) in wanted
        }

    async def get_or_create(
        self, *, defaults: Mapping[str, Any] | None = None, **keys: Any
    ) -> tuple[T, bool]:
        found = await self.query().filter(**keys).first() if keys else None
        if found is not None:
            return found, False
        entity: T = self.entity(**{**(defaults or {}), **keys})
        await self.add(entity)
        return entity, True


class InMemoryUnitOfWork:
    """A unit of work over an :class:`InMemoryStore`, with the SQL one's semantics.

    Declare it by passing the SQL unit of work class: its repository annotations become
    in-memory repositories with the same allow-lists.
    """

    def __init__(
        self,
        uow_type: type[UnitOfWork],
        store: InMemoryStore,
        *,
        dispatcher: EventDispatcher | None = None,
        clock: Clock | None = None,
        max_event_depth: int = 8,
    ) -> None:
        self._uow_type = uow_type
        self._store = store
        self._dispatcher = dispatcher
        self._clock = clock or SystemClock()
        self._max_depth = max_event_depth
        self._state = UnitOfWorkState.NEW
        self._loaded: dict[type[Any], dict[Any, tuple[Any, dict[str, Any]]]] = {}
        self._new: list[Any] = []
        self._deleted: list[Any] = []
        self._emitted: list[RecordedEvent] = []
        self.events: list[Event] = []
        self.correlation_id = ""
        self._repos: dict[str, InMemoryRepository[Any]] = {}

    @property
    def state(self) -> UnitOfWorkState:
        """The lifecycle state (as for the SQL unit of work)."""
        return self._state

    def _require_active(self) -> None:
        if self._state is not UnitOfWorkState.ACTIVE:
            raise UnitOfWorkError(f"unit of work is {self._state.value}; open a new one")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        repo_type = self._uow_type.declared_repositories().get(name)
        if repo_type is None:
            raise AttributeError(name)
        self._require_active()
        repo = self._repos.get(name)
        if repo is None:
            repo = self._repos[name] = InMemoryRepository(self, repo_type)
        return repo

    async def __aenter__(self) -> InMemoryUnitOfWork:
        if self._state is not UnitOfWorkState.NEW:
            raise UnitOfWorkError("a unit of work is entered once")
        self._state = UnitOfWorkState.ACTIVE
        self.correlation_id = current_context().correlation_id or str(new_id())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # Leaving without commit discards the working copies: nothing reaches the store.
        if self._state is not UnitOfWorkState.COMMITTED:
            self._state = UnitOfWorkState.CLOSED

    def _all(self, cls: type[Any]) -> builtins.list[Any]:
        loaded = self._loaded.setdefault(cls, {})
        for key, data in self._store.table(cls).items():
            if key not in loaded:
                loaded[key] = (_restore(cls, data, self._resolve), data)
        deleted = {id(obj) for obj in self._deleted}
        objects = [obj for obj, _ in loaded.values() if obj is not None and id(obj) not in deleted]
        return objects + [
            obj for obj in self._new if isinstance(obj, cls) and id(obj) not in deleted
        ]

    def _resolve(self, ref: _Ref) -> Any:
        loaded = self._loaded.setdefault(ref.cls, {})
        if ref.key not in loaded:
            data = self._store.table(ref.cls).get(ref.key)
            if data is None:
                return next(
                    (o for o in self._new if isinstance(o, ref.cls) and _ref(o) == ref), None
                )
            loaded[ref.key] = (None, data)  # reserved first: links may be circular
            loaded[ref.key] = (_restore(ref.cls, data, self._resolve), data)
        return loaded[ref.key][0]

    def _cascade(self) -> None:
        """New objects reachable through links become new rows (SQLAlchemy's save-update)."""
        known = {id(obj) for obj in self._new}
        pending = list(self._new) + [o for t in self._loaded.values() for o, _ in t.values()]
        while pending:
            obj = pending.pop()
            if obj is None:
                continue
            mapper: Mapper[Any] = sa_inspect(type(obj))
            state = sa_inspect(obj)
            for rel in _links(mapper, entity_info(mapper)):
                value = state.dict.get(rel.key)
                for target in value if isinstance(value, list) else [value]:
                    if target is None or id(target) in known:
                        continue
                    key = entity_info(type(target)).identity(target)
                    if key in self._loaded.get(type(target), {}):
                        continue
                    if key in self._store.table(type(target)):
                        continue
                    target_info = entity_info(type(target))
                    tenant = target_info.tenant_key
                    if tenant is not None and getattr(target, tenant) is None:
                        setattr(target, tenant, tenant_for_write(target_info, current_context()))
                    known.add(id(target))
                    self._new.append(target)
                    pending.append(target)

    def emit(self, event: Event) -> None:
        self._require_active()
        self._emitted.append(make_record(event, None))

    def _collect(self) -> list[RecordedEvent]:
        batch, self._emitted = self._emitted, []
        seen = [obj for table in self._loaded.values() for obj, _ in table.values()]
        for obj in [*self._new, *seen, *self._deleted]:
            if isinstance(obj, AggregateRoot) and obj.has_pending_events():
                batch.extend(obj.collect_events())
        batch.sort(key=lambda record: record.seq)
        return batch

    async def commit(self) -> None:
        self._require_active()
        collected: list[RecordedEvent] = []
        for depth in range(self._max_depth + 1):
            batch = self._collect()
            if not batch:
                break
            if depth == self._max_depth:
                raise UnitOfWorkError(f"events still being raised after {self._max_depth} rounds")
            collected += batch
            if self._dispatcher is not None:
                await dispatch_round(self._dispatcher, batch, self)
        try:
            self._cascade()
            writes = self._writes()
        except Exception:
            self._state = UnitOfWorkState.ROLLED_BACK
            raise
        for cls, key, data in writes:
            if data is None:
                self._store.table(cls).pop(key, None)
            else:
                self._store.table(cls)[key] = data
        for row in build_outbox_rows(collected, correlation_id=self.correlation_id):
            row["position"] = len(self._store.outbox) + 1
            self._store.outbox.append(row)
        self.events = [record.event for record in collected]
        self._state = UnitOfWorkState.COMMITTED

    def _writes(self) -> list[tuple[type[Any], Any, dict[str, Any] | None]]:
        now = self._clock.now()
        ctx = current_context()
        writes: list[tuple[type[Any], Any, dict[str, Any] | None]] = []
        for obj in self._new:
            info = entity_info(type(obj))
            key = info.identity(obj)
            if key in self._store.table(type(obj)):
                raise DuplicateKey(f"{info.describe(obj)} exists already", constraint=None)
            for stamp in (info.created_key, info.updated_key):
                if stamp is not None and getattr(obj, stamp) is None:
                    setattr(obj, stamp, now)
            if info.version_key is not None and getattr(obj, info.version_key) is None:
                setattr(obj, info.version_key, 1)
            writes.append((type(obj), key, _snapshot(obj)))
        deleted = {id(obj) for obj in self._deleted}
        for cls, table in self._loaded.items():
            info = entity_info(cls)
            for key, (obj, original) in table.items():
                if id(obj) in deleted:
                    writes.append((cls, key, None))
                    continue
                current = _snapshot(obj)
                if current == original:
                    continue
                tenant = info.tenant_key
                if tenant is not None and not ctx.system and current[tenant] != original[tenant]:
                    raise TenantViolation(f"{info.describe(obj)}: the tenant cannot change")
                stored = self._store.table(cls).get(key)
                if stored is not original and stored != original:
                    raise ConcurrencyConflict(
                        f"{info.describe(obj)} was changed by another unit of work",
                        entities=(info.describe(obj),),
                    )
                if info.version_key is not None:
                    setattr(obj, info.version_key, (getattr(obj, info.version_key) or 0) + 1)
                if info.updated_key is not None:
                    setattr(obj, info.updated_key, now)
                writes.append((cls, key, _snapshot(obj)))
        return writes

    async def rollback(self) -> None:
        """Discard this unit of work's changes."""
        self._require_active()
        self._state = UnitOfWorkState.ROLLED_BACK


class InMemoryUnitOfWorkFactory(Generic[U]):
    """Builds :class:`InMemoryUnitOfWork` s sharing one store: ``async with factory() as uow``."""

    def __init__(
        self,
        uow_type: type[UnitOfWork],
        store: InMemoryStore | None = None,
        *,
        dispatcher: EventDispatcher | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not (isinstance(uow_type, type) and issubclass(uow_type, UnitOfWork)):
            raise ConfigurationError(f"expected a UnitOfWork subclass, got {uow_type!r}")
        uow_type.declared_repositories()
        self.uow_type = uow_type
        self.store = store if store is not None else InMemoryStore()
        self.dispatcher = dispatcher
        self.clock = clock

    def __call__(self) -> Any:
        return InMemoryUnitOfWork(
            self.uow_type, self.store, dispatcher=self.dispatcher, clock=self.clock
        )
