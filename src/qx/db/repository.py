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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from sqlalchemy import func, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import Select

from qx.core.context import current_context
from qx.core.errors import ConfigurationError, InvalidQuery, NotFound
from qx.db.errors import translating
from qx.db.mapping import EntityInfo, entity_info
from qx.db.query import coerce_value, equality_criteria, order_by_clauses
from qx.db.scoping import WITH_DELETED, tenant_for_write, visible
from qx.db.session import QxSession

if TYPE_CHECKING:
    from qx.db.uow import UnitOfWork

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


class Repository(Generic[T]):
    """Generic repository of one mapped aggregate type.

    Class attributes:
        entity: the mapped class; inferred from ``Repository[Order]``.
        filterable: field names accepted as filters (an allow-list: empty means none).
        sortable: field names accepted as sort keys.
        default_order: sort applied by :meth:`list` when none is given.
        max_limit: the largest ``limit`` a caller may ask for.
    """

    entity: ClassVar[type[Any]]
    filterable: ClassVar[frozenset[str]] = frozenset()
    sortable: ClassVar[frozenset[str]] = frozenset()
    default_order: ClassVar[tuple[str, ...]] = ()
    max_limit: ClassVar[int] = 1000
    _qx_resolved: ClassVar[tuple[Mapper[Any], EntityInfo] | None] = None

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

    def __init__(self, session: AsyncSession, *, uow: UnitOfWork | None = None) -> None:
        entity = getattr(type(self), "entity", None)
        if entity is None:
            raise ConfigurationError(
                f"{type(self).__qualname__} has no entity: subclass Repository[YourClass]"
            )
        if not isinstance(session.sync_session, QxSession):
            raise ConfigurationError(
                "repositories need a session from qx.db.create_session_factory() "
                "(its hooks enforce tenant scoping and versioning)"
            )
        self._session = session
        self._uow = uow
        cls = type(self)
        resolved = cls.__dict__.get("_qx_resolved")
        if resolved is None:
            # Resolved once per repository class, not once per unit of work.
            resolved = (inspect(entity), entity_info(entity))
            cls._qx_resolved = resolved
        self._mapper: Mapper[Any] = resolved[0]
        self._info: EntityInfo = resolved[1]
        self._name = cls.__qualname__

    @property
    def session(self) -> AsyncSession:
        """The session this repository works in."""
        self._guard()
        return self._session

    def _guard(self) -> None:
        if self._uow is not None:
            self._uow._require_active()

    # -- reads ------------------------------------------------------------------------------

    def _coerce_id(self, ident: Any) -> Any:
        columns = self._mapper.primary_key
        values = ident if isinstance(ident, tuple) else (ident,)
        if len(values) != len(columns):
            raise InvalidQuery(
                f"{self._info.name} has a {len(columns)}-column primary key, got {ident!r}",
                field="id",
            )
        coerced = tuple(
            coerce_value(column, value, field=self._info.pk_keys[i])
            for i, (column, value) in enumerate(zip(columns, values, strict=True))
        )
        if any(v is None for v in coerced):
            raise InvalidQuery(f"{self._info.name} id cannot be None", field="id")
        return coerced if len(coerced) > 1 else coerced[0]

    async def get(self, ident: Any, *, with_deleted: bool = False) -> T | None:
        """Return the entity with this primary key, or ``None``.

        ``None`` also for another tenant's row or a soft-deleted one (unless
        ``with_deleted``).

        Raises:
            InvalidQuery: ``ident`` is not a valid primary key value.
            TenantRequired: the entity is tenant-scoped and there is no tenant in context.
        """
        self._guard()
        key = self._coerce_id(ident)
        options = {WITH_DELETED: True} if with_deleted else None
        with translating(self._session.sync_session):
            obj = await self._session.get(self.entity, key, execution_options=options or {})
        if obj is None or not visible(
            self._info, obj, current_context(), with_deleted=with_deleted
        ):
            return None
        result: T = obj
        return result

    async def require(self, ident: Any, *, with_deleted: bool = False) -> T:
        """Like :meth:`get`, but raise ``NotFound`` naming the entity and id."""
        found = await self.get(ident, with_deleted=with_deleted)
        if found is None:
            raise NotFound(entity=self._info.name, key=ident)
        return found

    def _select(self, filters: dict[str, Any]) -> Select[Any]:
        criteria = equality_criteria(
            self._mapper, filters, allowed=self.filterable, owner=self._name
        )
        return select(self.entity).where(*criteria)

    @staticmethod
    def _check_window(name: str, value: int | None, maximum: int | None = None) -> None:
        if value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidQuery(f"{name} must be a non-negative integer, got {value!r}", field=name)
        if maximum is not None and value > maximum:
            raise InvalidQuery(f"{name} must be at most {maximum}, got {value}", field=name)

    async def list(
        self,
        *,
        order_by: str | Sequence[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
        with_deleted: bool = False,
        **filters: Any,
    ) -> builtins.list[T]:
        """Return entities matching equality ``filters``, sorted, windowed.

        Args:
            order_by: sort keys (``"-created_at"`` for descending); the primary key is always
                appended so the order is total.
            limit: at most this many (``max_limit`` caps it).
            offset: skip this many.
            with_deleted: include soft-deleted rows.
            **filters: ``field=value`` (``None`` means IS NULL); fields must be in
                ``filterable``.

        Raises:
            InvalidQuery: an unknown or not-allowed field or sort key, or a bad value.
        """
        self._guard()
        self._check_window("limit", limit, self.max_limit)
        self._check_window("offset", offset)
        stmt = self._select(filters).order_by(
            *order_by_clauses(
                self._mapper,
                order_by if order_by is not None else self.default_order,
                allowed=self.sortable,
                owner=self._name,
            )
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset:
            stmt = stmt.offset(offset)
        with translating(self._session.sync_session):
            result = await self._session.scalars(
                stmt, execution_options={WITH_DELETED: with_deleted}
            )
            return builtins.list(result.all())

    async def count(self, *, with_deleted: bool = False, **filters: Any) -> int:
        """Return how many entities match equality ``filters``."""
        self._guard()
        pk = getattr(self.entity, self._info.pk_keys[0])
        criteria = equality_criteria(
            self._mapper, filters, allowed=self.filterable, owner=self._name
        )
        stmt = select(func.count(pk)).where(*criteria)
        with translating(self._session.sync_session):
            value = await self._session.scalar(stmt, execution_options={WITH_DELETED: with_deleted})
        return int(value or 0)

    async def exists(self, *, with_deleted: bool = False, **filters: Any) -> bool:
        """Return whether any entity matches equality ``filters``."""
        self._guard()
        pk = getattr(self.entity, self._info.pk_keys[0])
        criteria = equality_criteria(
            self._mapper, filters, allowed=self.filterable, owner=self._name
        )
        with translating(self._session.sync_session):
            found = await self._session.scalar(
                select(pk).where(*criteria).limit(1),
                execution_options={WITH_DELETED: with_deleted},
            )
        return found is not None

    # -- writes -----------------------------------------------------------------------------

    def _check_type(self, entity: Any) -> None:
        if not isinstance(entity, self.entity):
            raise InvalidQuery(
                f"{self._name} stores {self._info.name}, got {type(entity).__qualname__}"
            )

    def _check_own(self, entity: Any) -> None:
        self._check_type(entity)
        state = inspect(entity)
        if state.session is not self._session.sync_session or not state.persistent:
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
        self._guard()
        self._check_type(entity)
        if self._info.tenant_key is not None and getattr(entity, self._info.tenant_key) is None:
            setattr(entity, self._info.tenant_key, tenant_for_write(self._info, current_context()))
        self._session.add(entity)
        return entity

    async def add_many(self, entities: Iterable[T]) -> builtins.list[T]:
        """Add several new entities (inserted in batches at flush)."""
        added = builtins.list(entities)
        for entity in added:
            await self.add(entity)
        return added

    async def remove(self, entity: T) -> None:
        """Remove an entity: a soft delete when the table has ``deleted_at``, else a DELETE.

        Removing an already soft-deleted entity keeps its first ``deleted_at``.
        """
        self._guard()
        self._check_own(entity)
        key = self._info.deleted_key
        if key is None:
            await self._session.delete(entity)
            return
        if getattr(entity, key) is None:
            clock = self._session.sync_session.clock()  # type: ignore[attr-defined]
            setattr(entity, key, clock.now())

    async def hard_remove(self, entity: T) -> None:
        """DELETE the entity's row (and its owned parts), even on a soft-delete table."""
        self._guard()
        self._check_own(entity)
        await self._session.delete(entity)
