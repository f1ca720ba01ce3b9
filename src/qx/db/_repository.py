"""``Repository[T]``: typed, scoped access to one aggregate type inside a unit of work.

A repository never commits: it works in the unit of work's session and transaction. Every
statement it emits is tenant- and soft-delete-scoped by the session hooks; objects found in
the identity map without SQL are checked the same way, so no path returns another tenant's
row or a deleted one.

Example:
    >>> class OrderRepository(Repository[Order]):          # doctest: +SKIP
    ...     filterable = {"customer", "status"}
    ...     sortable = {"created_at", "customer"}
    >>> async with uow_factory() as uow:                     # doctest: +SKIP
    ...     order = await uow.orders.require(order_id)
    ...     paid = await uow.orders.list(status="paid", order_by="-created_at", limit=20)
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin
from uuid import UUID

from sqlalchemy import Select, Uuid, bindparam, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import opt_manager_of_class

from qx.core._context import current_context
from qx.core._errors import ConfigurationError, DuplicateKey, InvalidQuery, NotFound, shown
from qx.db._insert_new import writes_directly
from qx.db._mapping import entity_info
from qx.db._model import model_of
from qx.db._scoping import (
    WITH_DELETED,
    JoinedPart,
    checks_rows_in_python,
    joined_part,
    scope_tenant,
    scoped_closure,
    tenant_for_write,
    visible,
    visible_parts,
)
from qx.db._session import LoadingByKey, QxSession, read_alone
from qx.db._tracking import transaction_of
from qx.db._transaction import RowsChecked
from qx.db._translate import translating
from qx.db.query._bulk import upsert_rows
from qx.db.query._coerce import coerce_value, coercer_of
from qx.db.query._cursor import CursorCodec
from qx.db.query._fields import column_attribute
from qx.db.query._keyset import resolve_sort
from qx.db.query._page import Page
from qx.db.query._queryset import QuerySet
from qx.db.query._spec import Bound, Owner, QuerySpec

__all__ = ["Repository"]

T = TypeVar("T")


def _entity_from_bases(cls: type[Any]) -> type[Any] | None:
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Repository):
            args = get_args(base)
            if args and isinstance(args[0], type):
                return args[0]
    return None


@dataclass(frozen=True, slots=True)
class _Resolved:
    """What a repository class needs to know about its entity, worked out once."""

    spec: QuerySpec
    uuid_pk: bool
    #: whether a tenant or soft-delete column is reachable from the entity (else a load has
    #: nothing to scope and get() nothing to check)
    scoped: bool
    rows_checked: bool
    joined: JoinedPart | None
    #: get()'s primary-key load, built once: ``session.get`` builds a statement and computes
    #: its cache key on every call (a tenth of a one-row get's CPU). The joined part's
    #: options are in it where get() checks rows itself (``rows_checked`` or not scoped).
    by_key: Select[Any]
    #: the bound parameter of each primary-key column, in ``mapper.primary_key`` order
    key_params: tuple[str, ...]
    #: converts a single-column key (``None`` for a composite key)
    key_coercer: Callable[[Any, str], Any] | None


def _resolve(cls: type[Repository[Any]]) -> _Resolved:
    entity = getattr(cls, "entity", None)
    if entity is None:
        raise ConfigurationError(
            f"{cls.__qualname__} has no entity: subclass Repository[YourClass]"
        )
    info = entity_info(entity)  # a clear ConfigurationError for an unmapped class
    mapper: Mapper[Any] = inspect(entity)
    keys = mapper.primary_key
    owner = cls.__qualname__
    default_sort = resolve_sort(
        mapper,
        list(cls.default_order),
        # The class declared it, so it is trusted beyond ``sortable``.
        allowed=[key.lstrip("+-") for key in cls.default_order],
        owner=owner,
    )
    spec = QuerySpec(
        entity=entity,
        mapper=mapper,
        info=info,
        owner=owner,
        filterable=cls.filterable,
        sortable=cls.sortable,
        default_sort=default_sort,
        max_limit=cls.max_limit,
    )
    joined = joined_part(mapper)
    scoped = bool(scoped_closure(mapper))
    rows_checked = checks_rows_in_python(mapper)
    key_params = tuple(f"qx_key_{n}" for n in range(len(keys)))
    by_key = select(entity).where(
        *(column == bindparam(name) for column, name in zip(keys, key_params, strict=True))
    )
    if joined is not None and (rows_checked or not scoped):
        by_key = by_key.options(*joined.options)
    return _Resolved(
        spec=spec,
        uuid_pk=len(keys) == 1 and isinstance(keys[0].type, Uuid) and keys[0].type.as_uuid,
        scoped=scoped,
        rows_checked=rows_checked,
        joined=joined,
        by_key=by_key,
        key_params=key_params,
        key_coercer=coercer_of(keys[0]) if len(keys) == 1 else None,
    )


_NO_OPTIONS: Mapping[str, Any] = {}
_WITH_DELETED: Mapping[str, Any] = {WITH_DELETED: True}


def _load_by_key(
    session: Session,
    resolved: _Resolved,
    keys: tuple[Any, ...],
    params: dict[str, Any],
    options: Mapping[str, Any],
) -> Any:
    """``Session.get`` with the repository's prebuilt statement: the identity map first (an
    expired object is refreshed there, a deleted one is ``None``), else one load."""
    mapper = resolved.spec.mapper
    found = session._identity_lookup(mapper, keys)
    if found is not None:
        return found if isinstance(found, mapper.class_) else None
    with read_alone(session, mapper):  # its eager loads too, as in READ COMMITTED
        result = session.execute(resolved.by_key, params, execution_options=options)
        return result.unique().scalars().one_or_none()


def _resolved(cls: type[Repository[Any]]) -> _Resolved:
    # Once per repository class and mapping, not per unit of work: held by the entity's
    # MapperModel, not on the user's class.
    manager = opt_manager_of_class(getattr(cls, "entity", None))  # type: ignore[arg-type]
    repositories = model_of(manager.mapper).repositories if manager is not None else None
    found: _Resolved | None = repositories.get(cls) if repositories is not None else None
    if found is None:
        found = _resolve(cls)  # a clear ConfigurationError when the entity is not mapped
        repositories = model_of(found.spec.mapper).repositories
        repositories[cls] = found
    return found


class Repository(Generic[T]):
    """Generic repository of one mapped aggregate type.

    Class attributes:
        entity: the mapped class; inferred from ``Repository[Order]``.
        filterable: field names accepted as filters (an allow-list: empty means none).
        sortable: field names accepted as sort keys.
        default_order: sort applied by :meth:`list` when none is given.
        max_limit: the largest ``limit`` a caller may ask for.

    Subclasses add their own methods; ``self.session`` and ``self.query()`` are what they
    build on.
    """

    entity: ClassVar[type[Any]]
    filterable: ClassVar[frozenset[str]] = frozenset()
    sortable: ClassVar[frozenset[str]] = frozenset()
    default_order: ClassVar[tuple[str, ...]] = ()
    max_limit: ClassVar[int] = 1000

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "entity" not in cls.__dict__:
            found = _entity_from_bases(cls)
            if found is not None:
                cls.entity = found
        for name in ("filterable", "sortable"):
            value = cls.__dict__.get(name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ConfigurationError(f"{cls.__qualname__}.{name} must be a set of names")
                setattr(cls, name, frozenset(value))
        if isinstance(cls.__dict__.get("default_order"), str):
            cls.default_order = (cls.__dict__["default_order"],)

    def __init__(
        self,
        session: AsyncSession,
        *,
        uow: Owner | None = None,
        cursor_codec: CursorCodec | None = None,
    ) -> None:
        resolved = _resolved(type(self))
        if not isinstance(session.sync_session, QxSession):
            raise ConfigurationError(
                "repositories need a session from qx.db.create_session_factory() "
                "(its hooks enforce tenant scoping and versioning)"
            )
        self._resolved: _Resolved = resolved
        self._spec = resolved.spec
        self._info = resolved.spec.info
        self._bound = Bound(session, uow, cursor_codec)

    @property
    def session(self) -> AsyncSession:
        """The session this repository works in (its unit of work must be active)."""
        return self._bound.session

    # -- reads ------------------------------------------------------------------------------

    def _coerce_id(self, ident: Any) -> Any:
        resolved = self._resolved
        if type(ident) is UUID and resolved.uuid_pk:
            return ident  # the common case needs no conversion or range check
        single = resolved.key_coercer
        if single is not None and ident is not None and type(ident) is not tuple:
            return single(ident, self._info.pk_keys[0])
        columns = self._spec.mapper.primary_key
        values = ident if isinstance(ident, tuple) else (ident,)
        if len(values) != len(columns):
            raise InvalidQuery(
                f"{self._info.name} has a {len(columns)}-column primary key, got {shown(ident)}",
                field="id",
            )
        pk_keys = self._info.pk_keys
        # A list comprehension and a plain loop: this runs on every get() of a key that is not
        # a UUID, and generator expressions cost a call each.
        coerced = [
            coerce_value(column, value, field=pk_keys[i])
            for i, (column, value) in enumerate(zip(columns, values, strict=True))
        ]
        for value in coerced:
            if value is None:
                raise InvalidQuery(f"{self._info.name} id cannot be None", field="id")
        return tuple(coerced) if len(coerced) > 1 else coerced[0]

    async def get(self, ident: Any, *, with_deleted: bool = False) -> T | None:
        """Return the entity with this primary key, or ``None``.

        ``None`` also for another tenant's row or a soft-deleted one (unless
        ``with_deleted``).

        Raises:
            InvalidQuery: ``ident`` is not a valid primary key value.
            TenantRequired: the entity is tenant-scoped and there is no tenant in context.
        """
        session = self._bound.session
        key = self._coerce_id(ident)
        resolved = self._resolved
        scoped = resolved.scoped  # else no tenant, no soft delete: nothing to check
        if scoped:
            ctx = current_context()
            if ctx.tenant_id is None and not ctx.system:
                scope_tenant(scoped_closure(self._spec.mapper), ctx)  # fail closed, found or not
        sync: QxSession = session.sync_session  # type: ignore[assignment]
        tx = transaction_of(sync)
        keys = key if type(key) is tuple else (key,)
        params = dict(zip(resolved.key_params, keys, strict=True))
        try:
            with LoadingByKey(sync, self._spec.mapper, (key,)):
                if resolved.rows_checked or not scoped:
                    # The aggregate's relationships load in statements of their own, so the
                    # primary-key load reads the row as is (loader criteria would be
                    # processed again on every execution) and visible() checks it below.
                    # The note lets exactly that one load through unscoped and gives each
                    # eager load it triggers a tenant/soft-delete WHERE of its own. One
                    # owned relationship is joined into that load (see JoinedPart); its rows
                    # are checked by visible_parts() below. An entity with nothing to scope
                    # takes this path whatever its relationships: nothing to check.
                    tx.rows_checked = RowsChecked(with_deleted=with_deleted)
                    options: Mapping[str, Any] = _NO_OPTIONS
                else:
                    options = _WITH_DELETED if with_deleted else _NO_OPTIONS
                obj = await session.run_sync(_load_by_key, resolved, keys, params, options)
        finally:
            tx.rows_checked = None
        if obj is None or (scoped and not visible(self._info, obj, ctx, with_deleted=with_deleted)):
            return None
        if sync._deleted and instance_state(obj) in sync._deleted:
            # Removed in this unit of work, its DELETE not flushed yet: the identity map
            # still holds it, but it is gone (SQLAlchemy's pending-deletion set).
            return None
        if scoped and resolved.joined is not None:  # only set under rows_checked (joined_part)
            visible_parts(obj, resolved.joined, ctx, with_deleted=with_deleted)
        result: T = obj
        return result

    async def require(self, ident: Any, *, with_deleted: bool = False) -> T:
        """Like :meth:`get`, but raise ``NotFound`` naming the entity and id."""
        found = await self.get(ident, with_deleted=with_deleted)
        if found is None:
            raise NotFound(entity=self._info.name, key=ident)
        return found

    # -- queries ----------------------------------------------------------------------------

    def query(self) -> QuerySet[T]:
        """Start a chainable, immutable query (see :class:`qx.db.query.QuerySet`)."""
        return QuerySet(self._spec, self._bound)

    def _filtered(
        self,
        filters: Mapping[str, Any] | None,
        keywords: Mapping[str, Any],
        *,
        with_deleted: bool,
        sort: str | Sequence[str] | None = None,
    ) -> QuerySet[T]:
        if filters is not None and not isinstance(filters, Mapping):
            raise InvalidQuery(
                f"filters must be a mapping, got {type(filters).__name__}", field="filters"
            )
        query = self.query()
        merged = {**(filters or {}), **keywords}
        for key in merged:
            if not isinstance(key, str):
                raise InvalidQuery(f"filter keys are strings, got {shown(key)}", field="filters")
        if merged:
            query = query.filter(**merged)
        if sort is not None:
            query = query.order_by(*_sort_keys(sort))
        return query.with_deleted(with_deleted)

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
        """Return entities matching the filters, sorted, windowed.

        Filters use the query grammar (``status="paid"``, ``total__gte="100"``,
        ``lines__sku__in="A,B"``) as keywords or as a ``filters`` mapping of strings from an
        HTTP request; values are coerced to the column types.

        Args:
            filters: ``{"field__lookup": value}``; fields must be in ``filterable``.
            sort: sort keys (``"-created_at,customer"`` or a list); ``order_by`` is an alias.
                The primary key is always appended so the order is total.
            limit: at most this many (``max_limit`` caps it).
            offset: skip this many.
            with_deleted: include soft-deleted rows.
            **lookups: more filters, as keywords.

        Raises:
            InvalidQuery: an unknown or not-allowed field, lookup or sort key, or a bad value.
        """
        spec = sort if sort is not None else order_by
        query = self._filtered(filters, lookups, with_deleted=with_deleted, sort=spec)
        if limit is not None:
            query = query.limit(limit)
        if offset is not None:
            query = query.offset(offset)
        return await query.all()

    async def page(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        sort: str | Sequence[str] | None = None,
        page_size: int = 50,
        cursor: str | None = None,
        page_number: int | None = None,
        with_total: bool = False,
        with_deleted: bool = False,
    ) -> Page[T]:
        """One page of entities (keyset with ``cursor``, offset with ``page_number``)."""
        query = self._filtered(filters, {}, with_deleted=with_deleted, sort=sort)
        return await query.page(
            page_size=page_size, cursor=cursor, page_number=page_number, with_total=with_total
        )

    async def count(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        with_deleted: bool = False,
        **lookups: Any,
    ) -> int:
        """Return how many entities match the filters."""
        return await self._filtered(filters, lookups, with_deleted=with_deleted).count()

    async def exists(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        with_deleted: bool = False,
        **lookups: Any,
    ) -> bool:
        """Return whether any entity matches the filters."""
        return await self._filtered(filters, lookups, with_deleted=with_deleted).exists()

    async def in_bulk(self, ids: Iterable[Any], *, with_deleted: bool = False) -> dict[Any, T]:
        """Return ``{id: entity}`` for the ids that exist and are visible (others are absent).

        Raises:
            InvalidQuery: an id that is not a valid primary key value, or a composite key.
        """
        if len(self._info.pk_keys) != 1:
            raise InvalidQuery(f"in_bulk() needs a single-column primary key on {self._info.name}")
        if not isinstance(ids, Iterable) or isinstance(ids, str | bytes | bytearray | Mapping):
            raise InvalidQuery(f"ids must be a list of ids, got {shown(ids)}", field="ids")
        wanted = builtins.list(dict.fromkeys(self._coerce_id(ident) for ident in ids))
        with LoadingByKey(self._bound.sync, self._spec.mapper, wanted):
            return await self.query().with_deleted(with_deleted).by_keys(wanted)

    async def stream(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        sort: str | Sequence[str] | None = None,
        chunk_size: int = 1000,
        with_deleted: bool = False,
    ) -> AsyncIterator[T]:
        """Yield every matching entity, ``chunk_size`` rows at a time (flat memory)."""
        query = self._filtered(filters, {}, with_deleted=with_deleted, sort=sort)
        async for item in query.stream(chunk_size=chunk_size):
            yield item

    # -- writes -----------------------------------------------------------------------------

    def _check_type(self, entity: Any) -> None:
        if not isinstance(entity, self._spec.entity):
            raise InvalidQuery(
                f"{self._spec.owner} stores {self._info.name}, got {type(entity).__qualname__}"
            )

    def _check_new(self, entity: Any) -> None:
        self._check_type(entity)
        state = inspect(entity)
        if state.key is not None and state.session is not self._bound.sync:
            # Committed by, or loaded in, another unit of work (one that rolled back expired
            # its changes): saving it here would silently write nothing or stale values.
            ident = ":".join(str(v) for v in state.identity or ())  # attributes may be expired
            raise InvalidQuery(
                f"{self._info.name}({ident}) is already stored (loaded or committed by "
                "another unit of work); load it in this one with get()/require() and change "
                "that copy"
            )

    def _check_own(self, entity: Any) -> None:
        self._check_type(entity)
        state = inspect(entity)
        if state.session is not self._bound.sync or not state.persistent:
            raise InvalidQuery(
                f"{self._info.describe(entity)} was not loaded through this unit of work; "
                "load it with get()/require() before removing it"
            )
        if not visible(self._info, entity, current_context(), with_deleted=True):
            raise NotFound(entity=self._info.name, key=self._info.identity(entity))

    async def add(self, entity: T) -> T:
        """Add a new entity; it is inserted at the next flush or commit.

        A tenant-scoped entity with no tenant gets the context's tenant; one with another
        tenant is refused at flush.
        """
        self._check_new(entity)
        await self._deletes_first()
        if self._info.tenant_key is not None and getattr(entity, self._info.tenant_key) is None:
            setattr(entity, self._info.tenant_key, tenant_for_write(self._info, current_context()))
        self._add_new(self._bound.sync, entity)
        return entity

    async def add_many(self, entities: Iterable[T]) -> builtins.list[T]:
        """Add several new entities: the flush writes each table with one multi-row INSERT."""
        added = builtins.list(entities)
        key = self._info.tenant_key
        tenant = None
        for entity in added:
            self._check_new(entity)
            if key is not None and getattr(entity, key) is None:
                if tenant is None:
                    tenant = tenant_for_write(self._info, current_context())
                setattr(entity, key, tenant)
        await self._deletes_first()
        sync = self._bound.sync
        for entity in added:
            self._add_new(sync, entity)
        return added

    def _add_new(self, sync: QxSession, entity: Any) -> None:
        # A new object the insert path can write is noted on the transaction, not added to
        # the session: the session's bookkeeping of it (the cascade to its parts, the
        # attach events, detaching it after the write) was a fifth of the client's time
        # placing an order. Whatever else uses the session takes it in first (a flush, a
        # load by key), so it behaves as added from then on.
        state = instance_state(entity)
        if state.key is None and state.session_id is None and writes_directly(state.mapper):
            transaction_of(sync).add_new(entity, root=self._info.is_root)
        else:
            sync.add(entity)

    def _key_criteria(self, keys: Mapping[str, Any], what: str) -> builtins.list[Any]:
        if not keys:
            raise InvalidQuery(f"{what}() needs at least one field=value to look up", field="keys")
        criteria = []
        for name, raw in keys.items():
            attr = column_attribute(self._spec.mapper, name, owner=self._spec.owner)
            value = coerce_value(attr.expression, raw, field=name)
            criteria.append(attr.is_(None) if value is None else attr == value)
        return criteria

    def _build(self, values: Mapping[str, Any], what: str) -> T:
        for name in values:
            prop = self._spec.mapper.attrs.get(name) if isinstance(name, str) else None
            if prop is None:
                raise InvalidQuery(f"{self._info.name} has no field {shown(name)}", field=str(name))
        try:
            entity: T = self._spec.entity(**values)
        except TypeError as exc:
            raise InvalidQuery(
                f"{what}() cannot build {self._info.name} from {sorted(values)}: {exc}",
                field="defaults",
            ) from exc
        return entity

    async def _lookup(self, criteria: builtins.list[Any], *, lock: bool = False) -> T | None:
        stmt = select(self._spec.entity).where(*criteria).limit(2)
        session = self._bound.session
        if lock:
            stmt = self._bound.for_update(stmt, self._spec.mapper)
        rows = builtins.list((await session.scalars(stmt)).all())
        if len(rows) > 1:
            raise InvalidQuery(f"the lookup keys match more than one {self._info.name}")
        return rows[0] if rows else None

    async def get_or_create(
        self, *, defaults: Mapping[str, Any] | None = None, **keys: Any
    ) -> tuple[T, bool]:
        """Return ``(entity, created)``: the entity matching ``keys``, or a new one built from
        ``keys`` and ``defaults`` and inserted now.

        Safe under concurrency when ``keys`` are covered by a unique constraint: the INSERT
        runs in a SAVEPOINT, and a caller that loses the race reads the winner's row, so
        exactly one caller sees ``created=True``.

        Raises:
            InvalidQuery: unknown fields, keys matching several rows, or values that cannot
                build the entity.
            DuplicateKey: the insert collides with a row this caller cannot see (another
                tenant's, or a soft-deleted one).
        """
        criteria = self._key_criteria(keys, "get_or_create")
        found = await self._lookup(criteria)
        if found is not None:
            return found, False
        entity = self._build({**(defaults or {}), **keys}, "get_or_create")
        session = self._bound.session
        with translating(session.sync_session):
            await session.flush()  # the caller's pending changes are not part of the SAVEPOINT
        try:
            with translating(session.sync_session):
                async with session.begin_nested():
                    await self.add(entity)
                    await session.flush()
        except DuplicateKey:
            found = await self._lookup(criteria)
            if found is None:
                raise
            return found, False
        return entity, True

    async def update_or_create(
        self, *, defaults: Mapping[str, Any] | None = None, **keys: Any
    ) -> tuple[T, bool]:
        """Like :meth:`get_or_create`, then set ``defaults`` on an existing entity.

        The existing row is read ``FOR UPDATE`` (PostgreSQL), so concurrent callers apply
        their changes one after the other instead of failing on the version check.
        """
        values = dict(defaults or {})
        criteria = self._key_criteria(keys, "update_or_create")
        found = await self._lookup(criteria, lock=True)
        if found is None:
            return await self.get_or_create(defaults=values, **keys)
        self._apply(found, values)
        return found, False

    def _apply(self, entity: T, values: Mapping[str, Any]) -> None:
        managed = {
            k
            for k in (*self._info.pk_keys, self._info.version_key, self._info.tenant_key)
            if k is not None
        }
        for name, raw in values.items():
            if name in managed:
                raise InvalidQuery(f"{self._info.name}.{name} is maintained by qx", field=name)
            attr = column_attribute(self._spec.mapper, name, owner=self._spec.owner)
            setattr(entity, name, coerce_value(attr.expression, raw, field=name))

    async def upsert(
        self,
        entities: Iterable[T],
        *,
        conflict: Sequence[str],
        update: Sequence[str] | None = None,
    ) -> builtins.list[T]:
        """INSERT entities, updating the existing row on a ``conflict`` key (ON CONFLICT).

        Works on PostgreSQL and SQLite. Rows are written in multi-row statements; an updated
        row gets ``version + 1`` and ``updated_at``, and is revived if it was soft-deleted.
        A row owned by another tenant is never touched: meeting one raises.

        Args:
            entities: new instances of the entity (their owned parts are not written).
            conflict: the columns of a primary key or unique constraint (the tenant column is
                added when the constraint includes it).
            update: the columns overwritten on conflict; default: every column that is not
                a key or maintained by qx.

        Returns:
            The stored entities, as loaded back with RETURNING.

        Raises:
            InvalidQuery: unknown columns, no matching unique constraint, or entities with
                owned parts.
            TenantViolation: a conflicting row belongs to another tenant.
        """
        rows = builtins.list(entities)
        for entity in rows:
            self._check_type(entity)
        stored = await upsert_rows(self._spec, self._bound, rows, conflict, update)
        # Loaded back through the ORM so callers get tracked entities (and identity-map
        # copies are refreshed).
        found = await self.query().by_keys(stored, refresh=True)
        return [found[key] for key in stored if key in found]

    async def remove(self, entity: T) -> None:
        """Remove an entity: a soft delete when the table has ``deleted_at``, else a DELETE.

        Removing an already soft-deleted entity keeps its first ``deleted_at``.
        """
        self._check_own(entity)
        key = self._info.deleted_key
        if key is None:
            await self._delete(entity)
            return
        if getattr(entity, key) is None:
            setattr(entity, key, self._bound.clock().now())

    async def hard_remove(self, entity: T) -> None:
        """DELETE the entity's row (and its owned parts), even on a soft-delete table."""
        self._check_own(entity)
        await self._delete(entity)

    async def _delete(self, entity: T) -> None:
        # The DELETE waits for the next flush, so a loop of removals pays one flush, not
        # one per row; add() flushes it first (see _deletes_first).
        await self._bound.session.delete(entity)

    async def _deletes_first(self) -> None:
        # A flush INSERTs before it DELETEs: a replacement added after a removal with the
        # same unique key would collide with the row being removed. So pending DELETEs run
        # before anything is added, as if each removal had run at once (as Django's does).
        session = self._bound.session
        if session.sync_session.deleted:
            await session.flush()


def _sort_keys(sort: object) -> builtins.list[str]:
    """``sort`` as a list of keys: one string (``"-created_at,customer"``) or a sequence of
    them; anything else is ``InvalidQuery`` naming ``sort`` (a set has no order to keep)."""
    if isinstance(sort, str):
        return [sort]
    if isinstance(sort, Sequence) and not isinstance(sort, bytes | bytearray):
        keys = builtins.list(sort)
        if all(isinstance(key, str) for key in keys):
            return keys
    raise InvalidQuery(
        f"sort must be a string or a list of strings, got {shown(sort)}", field="sort"
    )
