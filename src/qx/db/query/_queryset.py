"""``QuerySet[T]``: a chainable, immutable query over one repository's aggregate.

Every builder method returns a new query and leaves its parent unchanged; keys, lookups,
values and sort keys are checked when the builder method is called, so a bad one fails where
it is written, not when the query runs. Terminals are awaited and run in the repository's
unit of work, under the same tenant and soft-delete scoping as every other statement.

Example:
    >>> paid = (
    ...     uow.orders.query()                                  # doctest: +SKIP
    ...     .filter(status="paid", created_at__gte=since)
    ...     .exclude(Q(customer__startswith="test") | Q(lines__sku="X"))
    ...     .order_by("-created_at")
    ...     .load("lines")
    ... )
    >>> page = await paid.page(page_size=20, cursor=request_cursor)  # doctest: +SKIP
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, Generic, Literal, NamedTuple, Self, TypeVar, overload

from sqlalchemy import Integer, Select, and_, bindparam, delete, func, select, true, tuple_, update
from sqlalchemy.orm import Mapper, RelationshipProperty, selectinload
from sqlalchemy.orm.interfaces import ORMOption
from sqlalchemy.sql.elements import ColumnElement

from qx.core._errors import InvalidCursor, InvalidQuery, NotFound, shown
from qx.db._scoping import WITH_DELETED
from qx.db._session import read_alone_async
from qx.db._tracking import transaction_of
from qx.db._transaction import RowsChecked
from qx.db._translate import translating
from qx.db.query._bulk import delete_owned
from qx.db.query._coerce import coerce_value
from qx.db.query._compiler import Checked, FilterCompiler, _resolve_path
from qx.db.query._cursor import Boundary
from qx.db.query._keyset import SortKey, keyset_segments, order_clauses
from qx.db.query._page import Page
from qx.db.query._q import Q, normalized
from qx.db.query._spec import Bound, QuerySpec
from qx.db.query._untracked import read_plan, untracked_rows

__all__ = ["QuerySet"]

T = TypeVar("T")

_BY_KEYS_CHUNK: Final = 10_000
#: The largest offset (a 32-bit count: beyond it, keyset pages are the way).
MAX_OFFSET: Final = 2**31 - 1
# The parameters of a planned statement's window (filters' are qx_f0, qx_f1, ...).
_LIMIT: Final = "qx_limit"
_OFFSET: Final = "qx_offset"


def _window(name: str, value: int) -> Any:
    return bindparam(name, value, type_=Integer())


def _locked_untracked() -> InvalidQuery:
    # Locks are taken to change what is read; an untracked row cannot change.
    return InvalidQuery("untracked() rows cannot be locked for update", field="untracked")


class _Run(NamedTuple):
    """A statement to run, its parameters, and whether its relationship loads are scoped by
    ``RowsChecked`` (its root rows by a plain WHERE; see ``ScopedStatement``)."""

    statement: Any
    params: dict[str, Any] | None
    checks_rows: bool = False


class _Built(NamedTuple):
    """A query's filters as SQL, and the joins they need (path -> alias, parent, key)."""

    where: tuple[ColumnElement[bool], ...]
    joins: Mapping[tuple[str, ...], tuple[Any, Any, str]]


def _check_count(name: str, value: Any, maximum: int | None = None, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidQuery(
            f"{name} must be an integer >= {minimum}, got {shown(value)}", field=name
        )
    if maximum is not None and value > maximum:
        raise InvalidQuery(f"{name} must be at most {maximum}, got {shown(value)}", field=name)
    return value


class QuerySet(Generic[T]):
    """An immutable query; build it with :meth:`qx.db.Repository.query`."""

    __slots__ = (
        "_bound",
        "_built",
        "_checked",
        "_distinct",
        "_extra",
        "_limit",
        "_load_paths",
        "_loads",
        "_lock",
        "_offset",
        "_order",
        "_qs",
        "_spec",
        "_untracked",
        "_with_deleted",
    )

    def __init__(self, spec: QuerySpec, bound: Bound) -> None:
        self._spec = spec
        self._bound = bound
        self._qs: tuple[Q, ...] = ()
        #: The filters, checked; their SQL is built when a statement needs it (_built).
        self._checked: tuple[Checked, ...] = ()
        #: Conditions built for their values (keyset boundaries).
        self._extra: tuple[ColumnElement[bool], ...] = ()
        self._built: _Built | None = None
        self._order: tuple[SortKey, ...] | None = None
        self._limit: int | None = None
        self._offset: int = 0
        self._distinct = False
        self._loads: tuple[ORMOption, ...] = ()
        self._load_paths: tuple[str, ...] = ()
        self._with_deleted = False
        self._lock = False
        self._untracked = False

    def _copy(self, **changes: Any) -> Self:
        # Spelled out rather than looped over __slots__: queries are built on every request.
        clone = object.__new__(type(self))
        clone._spec = self._spec
        clone._bound = self._bound
        clone._qs = self._qs
        clone._checked = self._checked
        clone._extra = self._extra
        clone._built = self._built
        clone._order = self._order
        clone._limit = self._limit
        clone._offset = self._offset
        clone._distinct = self._distinct
        clone._loads = self._loads
        clone._load_paths = self._load_paths
        clone._with_deleted = self._with_deleted
        clone._lock = self._lock
        clone._untracked = self._untracked
        for name, value in changes.items():
            setattr(clone, "_" + name, value)
        return clone

    def __repr__(self) -> str:
        parts = [repr(q) for q in self._qs]
        if self._order is not None:
            parts.append("order_by=" + ",".join(str(k) for k in self._order))
        if self._limit is not None:
            parts.append(f"limit={self._limit}")
        if self._offset:
            parts.append(f"offset={self._offset}")
        return f"<QuerySet {self._spec.info.name} {' '.join(parts)}>"

    # -- builders ---------------------------------------------------------------------------

    def _compiler(
        self, joins: Mapping[tuple[str, ...], tuple[Any, Any, str]] | None = None
    ) -> FilterCompiler:
        spec = self._spec
        return FilterCompiler(
            spec.mapper,
            allowed=spec.filterable,
            owner=spec.owner,
            dialect=self._bound.dialect(spec.mapper).name,
            joins=joins,
        )

    def _add(self, q: Q) -> Self:
        if not q:
            return self
        q = normalized(q)
        spec = self._spec
        checker = FilterCompiler(spec.mapper, allowed=spec.filterable, owner=spec.owner)
        checked = checker.check(q, first=sum(c.size for c in self._checked))
        return self._copy(qs=(*self._qs, q), checked=(*self._checked, checked), built=None)

    def _where_parts(self) -> _Built:
        """The filters' SQL and the joins it needs, built once per query object."""
        built = self._built
        if built is None:
            compiler = self._compiler()
            where = tuple(compiler.build(checked) for checked in self._checked) + self._extra
            built = self._built = _Built(where, compiler.joins)
        return built

    def for_update(self) -> Self:
        """Lock the rows read (``SELECT ... FOR UPDATE OF`` the entity's table on PostgreSQL)
        until the transaction ends, and refresh copies already loaded.

        Concurrent writers of the same aggregates then wait for each other instead of one
        failing with ``ConcurrencyConflict``: the choice for a hot row that every command
        changes (a stock level). Lock rows in one order everywhere (sort by key) to avoid
        deadlocks. SQLite serialises writers anyway; there it changes nothing.

        Example:
            >>> product = await uow.products.query().filter(sku="A").for_update().one()
            ...                                                         # doctest: +SKIP
        """
        if self._untracked:
            raise _locked_untracked()
        return self._copy(lock=True)

    def untracked(self, flag: bool = True) -> Self:
        """Read rows that no unit of work tracks: for a page, a report, a query handler.

        The rows are instances of the entity with what a tracked read loads with them (its
        parts, and relationships mapped eager) and what ``load()`` names, read under the
        same tenant and soft-delete scoping, without what tracking costs (an identity-map
        entry, committed values and instrumented collections per object: most of the
        client's time reading a page of aggregates). They are values: changes to them are
        never saved, and assigning a mapped attribute, reading one that was not read or
        adding them to a unit of work raises ``UnitOfWorkError``; each read builds its own
        objects (a row is one object within one read). ``stream()`` and ``for_update()``
        refuse it, as does a relationship through an association table.

        Raises:
            InvalidQuery: the query locks rows, or the class is mapped with inheritance.

        Example:
            >>> page = await uow.orders.query().order_by("-created_at").limit(50).untracked().all()
            ...                                                         # doctest: +SKIP
        """
        if flag:
            if self._lock:
                raise _locked_untracked()
            read_plan(self._spec.mapper)  # a class it cannot read fails here
        return self._copy(untracked=bool(flag))

    def filter(self, *conditions: Q, **lookups: Any) -> Self:
        """Keep rows matching every condition (``field__lookup=value`` or ``Q`` objects).

        Raises:
            InvalidQuery: an unknown field or lookup, a field outside ``filterable``, or a
                value that does not fit the column.
        """
        return self._add(Q(*conditions, **lookups))

    def exclude(self, *conditions: Q, **lookups: Any) -> Self:
        """Drop rows matching all the conditions (``NOT (...)``; NULLs never leak through)."""
        q = Q(*conditions, **lookups)
        return self._add(~q) if q else self

    def order_by(self, *keys: str) -> Self:
        """Sort by ``keys`` (``"-created_at"`` descending); no keys: back to the default.

        The primary key is always appended, so the order is total.

        Raises:
            InvalidQuery: a key outside ``sortable`` or not a column.
        """
        if not keys:
            return self._copy(order=None)
        spec = [
            part for key in keys for part in (key.split(",") if isinstance(key, str) else [key])
        ]
        return self._copy(order=self._spec.sort_keys(spec))

    def limit(self, count: int | None) -> Self:
        """Return at most ``count`` rows (capped by the repository's ``max_limit``)."""
        if count is None:
            return self._copy(limit=None)
        return self._copy(limit=_check_count("limit", count, self._spec.max_limit))

    def offset(self, count: int) -> Self:
        """Skip ``count`` rows."""
        return self._copy(offset=_check_count("offset", count, MAX_OFFSET))

    def distinct(self, flag: bool = True) -> Self:
        """SELECT DISTINCT (roots are never duplicated by relation filters anyway)."""
        return self._copy(distinct=bool(flag))

    def with_deleted(self, flag: bool = True) -> Self:
        """Include soft-deleted rows."""
        return self._copy(with_deleted=bool(flag))

    def load(self, *paths: str) -> Self:
        """Eager-load relationships (``"lines"``, ``"lines__product"``): one SELECT per level.

        Raises:
            InvalidQuery: a path that is not a chain of relationships.
        """
        options = list(self._loads)
        mapper = self._spec.mapper
        for path in paths:
            if not isinstance(path, str) or not path:
                raise InvalidQuery(f"invalid load path {shown(path)}", field=str(path))
            current, option, entity = mapper, None, mapper.class_
            for part in path.split("__"):
                prop = current.attrs.get(part)
                if not isinstance(prop, RelationshipProperty):
                    raise InvalidQuery(
                        f"{current.class_.__name__} has no relationship {shown(part)} "
                        f"(in {shown(path)})",
                        field=path,
                    )
                attr = getattr(entity, part)
                option = selectinload(attr) if option is None else option.selectinload(attr)
                current = prop.mapper
                entity = current.class_
            assert option is not None
            options.append(option)
        return self._copy(loads=tuple(options), load_paths=(*self._load_paths, *paths))

    # -- statements -------------------------------------------------------------------------

    def _sort(self) -> tuple[SortKey, ...]:
        return self._order if self._order is not None else self._spec.default_sort

    def _from(
        self,
        stmt: Select[Any],
        joins: Mapping[tuple[str, ...], tuple[Any, Any, str]] | None = None,
    ) -> Select[Any]:
        built = self._where_parts()
        if joins is None:
            joins = built.joins
        if joins:
            # Joins start from the root, whatever the selected columns are.
            stmt = stmt.select_from(self._spec.entity)
        for alias, parent, key in joins.values():
            stmt = stmt.outerjoin(alias, getattr(parent, key).of_type(alias))
        if built.where:
            stmt = stmt.where(*built.where)
        return stmt

    def _statement(self, *, reverse: bool = False, streamed: bool = False) -> _Run:
        """The SELECT of this query's rows and the parameters to run it with.

        ``streamed``: read over many awaits, so its relationship loads cannot be scoped by
        a ``RowsChecked`` set for one call.
        """
        if self._lock:
            self._bound.require_lockable()  # per run: the plan is shared by units of work
        spec = self._spec
        rows_of = None
        untracked = self._untracked
        if (
            not streamed
            and not untracked  # its rows and their parts: each statement scoped whole
            and all(c.local for c in self._checked)
            and spec.rows_checked
        ):
            rows_of = spec.mapper
        return self._planned(
            ("rows", reverse, streamed, untracked),
            lambda bound: self._select(reverse=reverse, bound=bound),
            rows_of=rows_of,
        )

    def _planned(
        self,
        kind: tuple[Any, ...],
        build: Callable[[bool], Any],
        *,
        limit: bool = True,
        offset: bool = True,
        rows_of: Mapper[Any] | None = None,
    ) -> _Run:
        """The statement ``build`` makes for this query, and the parameters to run it with.

        Built once per shape (:class:`~qx.db.query._plans.StatementPlans`) and scoped once
        per scope: ``build(True)`` names the window it uses (``limit``, ``offset``: the
        query's own) as parameters too. A query whose SQL depends on its values (keyset
        boundaries, very large ``in`` lists) is built for itself: ``build(False)``, scoped
        by the session. ``rows_of``: see ``ScopedStatement``.
        """
        shapes = tuple(checked.shape for checked in self._checked)
        if self._extra or None in shapes:
            return _Run(build(False), None)
        shape = (
            kind,
            self._bound.dialect(self._spec.mapper).name,
            shapes,
            self._order,
            self._limit is not None,
            bool(self._offset),
            self._distinct,
            self._load_paths,
            self._lock,
        )
        plan = self._spec.plans.plan(shape, lambda: build(True), rows_of=rows_of)
        params = {name: value for checked in self._checked for name, value in checked.params}
        if limit and self._limit is not None:
            params[_LIMIT] = self._limit
        if offset and self._offset:
            params[_OFFSET] = self._offset
        return _Run(plan.scoped(with_deleted=self._with_deleted), params, plan.checks_rows)

    def _select(self, *, reverse: bool = False, bound: bool = False) -> Select[Any]:
        # bound: limit and offset as named parameters, for a statement built once per shape.
        entity = self._spec.entity
        if self._untracked:
            stmt = self._from(select(*read_plan(self._spec.mapper).columns))
        else:
            stmt = self._from(select(entity))
        if self._distinct:
            stmt = stmt.distinct()
        if self._order is None and not reverse:
            stmt = stmt.order_by(*self._spec.default_order)
        else:
            stmt = stmt.order_by(*order_clauses(entity, self._sort(), reverse=reverse))
        stmt = self._windowed(stmt, bound=bound)
        if self._loads and not self._untracked:
            stmt = stmt.options(*self._loads)
        if self._lock:
            stmt = self._bound.for_update(stmt, self._spec.mapper, of=self._spec.mapper.local_table)
        return stmt

    def _windowed(self, stmt: Select[Any], *, bound: bool) -> Select[Any]:
        """``stmt`` with the query's limit and offset: as the named parameters ``_planned``
        passes if ``bound`` (a statement built once per shape), else as literals."""
        if self._limit is not None:
            stmt = stmt.limit(_window(_LIMIT, self._limit) if bound else self._limit)
        if self._offset:
            stmt = stmt.offset(_window(_OFFSET, self._offset) if bound else self._offset)
        return stmt

    def _options(self) -> dict[str, Any]:
        if self._lock:
            # A locked read must see the row as it is now, not an earlier copy in the
            # identity map.
            return {WITH_DELETED: self._with_deleted, "populate_existing": True}
        return {WITH_DELETED: self._with_deleted}

    async def _scalars(
        self, stmt: Any, params: dict[str, Any] | None = None, *, checks_rows: bool = False
    ) -> builtins.list[Any]:
        session = self._bound.session
        sync = session.sync_session
        # A first statement that reads, locks nothing and has nothing to write before it
        # goes without BEGIN where the backend can (qx.db._session.read_alone).
        with (
            translating(sync),
            await read_alone_async(session, self._spec.mapper, locks=self._lock),
        ):
            if not checks_rows:
                result = await session.scalars(stmt, params, execution_options=self._options())
                return builtins.list(result.all())
            tx = transaction_of(sync)
            outer = tx.rows_checked
            tx.rows_checked = RowsChecked(with_deleted=self._with_deleted, root_pending=False)
            try:
                result = await session.scalars(stmt, params, execution_options=self._options())
                return builtins.list(result.all())  # relationship loads ran: buffered
            finally:
                tx.rows_checked = outer

    async def _rows(self, *, reverse: bool = False) -> builtins.list[Any]:
        run = self._statement(reverse=reverse)
        if self._untracked:
            return await self._untracked_rows(run)
        return await self._scalars(run.statement, run.params, checks_rows=run.checks_rows)

    async def _untracked_rows(self, run: _Run) -> builtins.list[Any]:
        session = self._bound.session
        options = self._options()

        async def execute(stmt: Any, params: dict[str, Any] | None) -> Sequence[Any]:
            return (await session.execute(stmt, params, execution_options=options)).all()

        # Its part loads too go without BEGIN when the first read does (read_alone_async).
        with (
            translating(session.sync_session),
            await read_alone_async(session, self._spec.mapper, locks=False),
        ):
            rows = await execute(run.statement, run.params)
            plan = read_plan(self._spec.mapper)
            dialect = self._bound.dialect(self._spec.mapper)
            return await untracked_rows(plan, rows, execute, dialect, self._load_paths)

    async def by_keys(self, keys: builtins.list[Any], *, refresh: bool = False) -> dict[Any, T]:
        """``{primary key: row}`` of the rows with these (single-column) keys, in chunks;
        ``refresh`` overwrites identity-map copies with the stored values."""
        pk = self._spec.info.pk_keys[0]
        if not isinstance(keys, Sequence) or isinstance(keys, str | bytes | bytearray):
            raise InvalidQuery(f"keys must be a list of {pk} values, got {shown(keys)}", field=pk)
        if not keys:
            return {}
        column = getattr(self._spec.entity, pk)
        table_column = self._spec.mapper.primary_key[0]
        coerced = [coerce_value(table_column, key, field=pk) for key in keys]
        if any(key is None for key in coerced):
            raise InvalidQuery(f"{pk} cannot be None", field=pk)
        keys = builtins.list(dict.fromkeys(coerced))
        dialect = self._bound.dialect(self._spec.mapper)
        found: dict[Any, T] = {}
        for start in range(0, len(keys), _BY_KEYS_CHUNK):
            chunk = keys[start : start + _BY_KEYS_CHUNK]
            matched = dialect.in_(column, chunk)
            if self._untracked:
                stmt = select(*read_plan(self._spec.mapper).columns).where(matched)
                rows = await self._untracked_rows(_Run(stmt, None))
            else:
                stmt = select(self._spec.entity).where(matched)
                if refresh:
                    stmt = stmt.execution_options(populate_existing=True)
                rows = await self._scalars(stmt)
            for obj in rows:
                found[getattr(obj, pk)] = obj
        return found

    def _pk_columns(self) -> builtins.list[Any]:
        entity = self._spec.entity
        return [getattr(entity, key) for key in self._spec.info.pk_keys]

    def _matching_pks(self) -> ColumnElement[bool]:
        """``pk IN (SELECT pk ... )``: the rows of this query, usable in UPDATE/DELETE."""
        if not self._where_parts().joins and self._limit is None and not self._offset:
            return self._where_clause()
        pks = self._pk_columns()
        target = pks[0] if len(pks) == 1 else tuple_(*pks)
        return target.in_(self._pk_select())

    def _pk_select(self) -> Select[Any]:
        """The primary keys of this query's rows, honouring ``limit``/``offset``."""
        stmt = self._from(select(*self._pk_columns()))
        if self._limit is not None or self._offset:
            stmt = stmt.order_by(*order_clauses(self._spec.entity, self._sort()))
            stmt = stmt.limit(self._limit).offset(self._offset or None)
        return stmt

    def _where_clause(self) -> ColumnElement[bool]:
        where = self._where_parts().where
        if not where:
            return true()
        return and_(*where) if len(where) > 1 else where[0]

    # -- terminals --------------------------------------------------------------------------

    async def all(self) -> builtins.list[T]:
        """Run the query and return every row."""
        return await self._rows()

    async def first(self) -> T | None:
        """Return the first row in order, or ``None``."""
        rows = await self.limit(1)._rows()
        return rows[0] if rows else None

    async def one(self) -> T:
        """Return the only matching row.

        Raises:
            NotFound: no row matches.
            InvalidQuery: more than one row matches.
        """
        rows = await self._copy(limit=2)._rows()
        if not rows:
            raise NotFound(entity=self._spec.info.name, key=" & ".join(map(repr, self._qs)) or "*")
        if len(rows) > 1:
            raise InvalidQuery(f"more than one {self._spec.info.name} matches {shown(self)}")
        return rows[0]  # type: ignore[no-any-return]

    async def count(self) -> int:
        """Return how many rows the query yields (respecting ``limit``/``offset``)."""

        def build(_bound: bool) -> Any:
            pks = self._pk_columns()
            counted = func.count(pks[0].distinct() if self._distinct else pks[0])
            return self._from(select(counted))

        stmt, params, _ = self._planned(("count",), build, limit=False, offset=False)
        session = self._bound.session
        with translating(session.sync_session):
            found = await session.scalar(stmt, params, execution_options=self._options())
            total = int(found or 0)
        total = max(total - self._offset, 0)
        return total if self._limit is None else min(total, self._limit)

    async def exists(self) -> bool:
        """Return whether the query yields any row."""

        def build(bound: bool) -> Any:
            stmt = self._from(select(self._pk_columns()[0])).limit(1)
            if self._offset:
                offset = _window(_OFFSET, self._offset) if bound else self._offset
                order = order_clauses(self._spec.entity, self._sort())
                stmt = stmt.order_by(*order).offset(offset)
            return stmt

        stmt, params, _ = self._planned(("exists",), build, limit=False)
        session = self._bound.session
        with translating(session.sync_session):
            found = await session.scalar(stmt, params, execution_options=self._options())
        return found is not None

    @overload
    async def values_list(
        self, *fields: str, flat: Literal[False] = False
    ) -> builtins.list[tuple[Any, ...]]: ...

    @overload
    async def values_list(self, *fields: str, flat: Literal[True]) -> builtins.list[Any]: ...

    async def values_list(
        self, *fields: str, flat: bool = False
    ) -> builtins.list[tuple[Any, ...]] | builtins.list[Any]:
        """Return tuples of column values, in the query's order.

        Any mapped column can be read, and many-to-one paths (``"customer__name"``): the
        repository's ``filterable`` and ``sortable`` govern what HTTP input may filter and
        sort by, not what code may read. Without fields, every column of the entity in
        mapping order.

        Example:
            >>> await uow.orders.query().filter(status="open").values_list(
            ...     "id", "customer__name")                            # doctest: +SKIP
            [(UUID('...'), 'ada'), ...]

        Args:
            flat: with exactly one field, return plain values instead of 1-tuples.

        Raises:
            InvalidQuery: an unknown field, a to-many path, or ``flat`` without exactly
                one field.
        """
        if flat and len(fields) != 1:
            raise InvalidQuery("flat=True needs exactly one field", field="fields")
        _names, rows = await self._value_rows(fields)
        if flat:
            return [row[0] for row in rows]
        return [tuple(row) for row in rows]

    async def values(self, *fields: str) -> builtins.list[dict[str, Any]]:
        """Return a dict per row, keyed by field name (as :meth:`values_list` reads them).

        Example:
            >>> await uow.orders.query().values("id", "status")   # doctest: +SKIP
            [{'id': UUID('...'), 'status': 'open'}, ...]

        Raises:
            InvalidQuery: an unknown field or a to-many path.
        """
        names, rows = await self._value_rows(fields)
        return [dict(zip(names, row, strict=True)) for row in rows]

    async def _value_rows(self, fields: tuple[str, ...]) -> tuple[tuple[str, ...], Sequence[Any]]:
        spec = self._spec
        if not fields:
            fields = tuple(attr.key for attr in spec.mapper.column_attrs)
        for name in fields:
            if not isinstance(name, str) or not name:
                raise InvalidQuery(f"invalid field {shown(name)}", field=str(name))

        def build(bound: bool) -> Any:
            # Unknown fields and to-many paths fail here, before a plan is kept.
            compiler = self._compiler(self._where_parts().joins)
            columns = []
            for name in fields:
                path = _resolve_path(spec.mapper, tuple(name.split("__")), spec.owner)
                base: Any = spec.entity
                for i, step in enumerate(path.steps):
                    if step.to_many:
                        raise InvalidQuery(
                            f"cannot read through to-many relationship {shown(step.key)}",
                            field=name,
                        )
                    base = compiler._join(path.parts[: i + 1], base, step)
                columns.append(getattr(base, path.column_key))
            stmt = self._from(select(*columns), compiler.joins)
            if self._distinct:
                stmt = stmt.distinct()
            else:
                stmt = stmt.order_by(*order_clauses(spec.entity, self._sort()))
            return self._windowed(stmt, bound=bound)

        stmt, params, _ = self._planned(("values", fields), build)
        session = self._bound.session
        with translating(session.sync_session):
            result = await session.execute(stmt, params, execution_options=self._options())
            rows = result.all()
        return fields, rows

    async def page(
        self,
        *,
        page_size: int = 50,
        cursor: str | None = None,
        page_number: int | None = None,
        with_total: bool = False,
    ) -> Page[T]:
        """Return one page: keyset pagination with ``cursor`` (default), or offset pagination
        with ``page_number``.

        Keyset pages are stable under inserts and cost the same at any depth; follow
        ``next_cursor`` / ``prev_cursor``. The cursor is signed and bound to this sort.

        Raises:
            InvalidCursor: the cursor is malformed, tampered with, signed with another secret
                or made for another sort.
            InvalidQuery: bad ``page_size`` / ``page_number``, both a cursor and a page
                number, or ``limit``/``offset`` already set on the query.
            ConfigurationError: keyset pagination without a cursor secret.
        """
        spec = self._spec
        size = _check_count("page_size", page_size, spec.max_limit, minimum=1)
        if self._limit is not None or self._offset:
            raise InvalidQuery("page() cannot be combined with limit()/offset()", field="page")
        total = await self.count() if with_total else None
        if page_number is not None:
            if cursor is not None:
                raise InvalidQuery("give a cursor or a page_number, not both", field="page_number")
            number = _check_count("page_number", page_number, MAX_OFFSET // size + 1, 1)
            rows = await self._copy(limit=size + 1, offset=(number - 1) * size)._rows()
            return Page(
                items=rows[:size],
                page_size=size,
                has_next=len(rows) > size,
                has_previous=number > 1,
                page_number=number,
                total=total,
            )
        keys = self._sort()
        signature = f"{spec.info.name}:{','.join(str(k) for k in keys)}"
        codec = self._bound.cursor_codec()
        backward = False
        segments: builtins.list[QuerySet[T]] = [self]
        if cursor is not None:
            found = codec.decode(cursor, sort=signature)
            backward = found.backward
            values = await self._boundary_values(keys, found)
            # One condition, or (a nullable leading key) two, each an index range: the rows
            # beyond the boundary, then the NULLs (or the reverse) - never a scan of what lies
            # before the boundary.
            segments = [
                self._copy(extra=(*self._extra, condition), built=None)
                for condition in keyset_segments(spec.entity, keys, values, backward=backward)
            ]
        rows = []
        for segment in segments:
            rows += await segment._copy(limit=size + 1 - len(rows))._rows(reverse=backward)
            if len(rows) > size:
                break
        more = len(rows) > size
        rows = rows[:size]
        if backward:
            rows.reverse()
        has_next = True if backward else more
        has_previous = more if backward else cursor is not None
        if not rows:
            has_next = has_previous = False

        def boundary(row: Any, back: bool) -> str:
            return codec.encode(
                sort=signature,
                backward=back,
                values=[getattr(row, k.key) for k in keys],
                key=[getattr(row, k) for k in spec.info.pk_keys],
            )

        return Page(
            items=rows,
            page_size=size,
            has_next=has_next,
            has_previous=has_previous,
            next_cursor=boundary(rows[-1], False) if has_next else None,
            prev_cursor=boundary(rows[0], True) if has_previous else None,
            total=total,
        )

    async def _boundary_values(
        self, keys: Sequence[SortKey], boundary: Boundary
    ) -> builtins.list[Any]:
        """The boundary row's sort values: from the cursor, or read by its primary key."""
        if not boundary.by_key:
            return self._cursor_values(keys, boundary.values)
        pk_keys = self._spec.info.pk_keys
        ident = self._coerced(
            [SortKey(k, False, False) for k in pk_keys], boundary.values, allow_null=False
        )
        entity = self._spec.entity
        stmt = select(*[getattr(entity, key.key) for key in keys]).where(
            *[getattr(entity, k) == v for k, v in zip(pk_keys, ident, strict=True)]
        )
        session = self._bound.session
        with translating(session.sync_session):
            row = (await session.execute(stmt, execution_options=self._options())).first()
        if row is None:
            raise InvalidCursor(
                "the row this cursor pages from is gone; start from the first page",
                field="cursor",
            )
        return list(row)

    def _cursor_values(
        self, keys: Sequence[SortKey], raw: builtins.list[Any]
    ) -> builtins.list[Any]:
        return self._coerced(keys, raw, allow_null=True)

    def _coerced(
        self, keys: Sequence[SortKey], raw: builtins.list[Any], *, allow_null: bool
    ) -> builtins.list[Any]:
        if len(raw) != len(keys):
            raise InvalidCursor("cursor does not match the sort keys", field="cursor")
        mapper = self._spec.mapper
        values = []
        for key, value in zip(keys, raw, strict=True):
            column = mapper.attrs[key.key].columns[0]
            try:
                coerced = coerce_value(column, value, field=key.key)
            except InvalidQuery:
                raise InvalidCursor(
                    "cursor values do not fit the sort keys", field="cursor"
                ) from None
            if coerced is None and not (allow_null and key.nullable):
                raise InvalidCursor("cursor values do not fit the sort keys", field="cursor")
            values.append(coerced)
        return values

    async def stream(self, *, chunk_size: int = 1000) -> AsyncIterator[T]:
        """Yield every row, fetched ``chunk_size`` at a time (a server-side cursor on
        PostgreSQL), so memory stays flat however many rows match.

        Use ``async for order in query.stream(): ...`` inside the unit of work. Once per
        chunk, pending changes are flushed (as an autoflush would) and the roots already
        yielded are let go of - except those still holding recorded events; a root let go of
        is held again if it records an event or a part of it changes (see
        ``qx.db._tracking.TransactionState.release``).
        """
        size = _check_count("chunk_size", chunk_size, 100_000, minimum=1)
        if self._untracked:
            raise InvalidQuery(
                "untracked() reads are read whole: use all() or pages", field="untracked"
            )
        session = self._bound.session
        options = {**self._options(), "yield_per": size}
        sync = self._bound.sync
        yielded: builtins.list[Any] = []
        with translating(sync):
            stmt, params, _ = self._statement(streamed=True)
            result = await session.stream_scalars(stmt, params, execution_options=options)
            try:
                async for row in result:
                    if len(yielded) == size:
                        # A new chunk has just been loaded. Writing what the caller changed
                        # lets the chunk before go: memory stays flat.
                        await session.flush()
                        transaction_of(sync).release(yielded)
                        yielded = []
                    yielded.append(row)
                    yield row
            finally:
                await result.close()

    # -- bulk writes ------------------------------------------------------------------------

    def _bulk_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        spec = self._spec
        info = spec.info
        managed = {
            key
            for key in (
                *info.pk_keys,
                info.version_key,
                info.tenant_key,
                info.created_key,
                info.updated_key,
                info.deleted_key,
            )
            if key is not None
        }
        if not values:
            raise InvalidQuery("update() needs at least one field=value", field="values")
        checked: dict[str, Any] = {}
        for key, raw in values.items():
            prop = spec.mapper.attrs.get(key)
            column = getattr(prop, "columns", [None])[0] if prop is not None else None
            if column is None or isinstance(prop, RelationshipProperty):
                raise InvalidQuery(f"{info.name} has no column field {shown(key)}", field=key)
            if key in managed:
                raise InvalidQuery(
                    f"{info.name}.{key} is maintained by qx and cannot be updated", field=key
                )
            value = coerce_value(column, raw, field=key)
            if value is None and not column.nullable:
                raise InvalidQuery(f"{info.name}.{key} cannot be None", field=key)
            checked[key] = value
        return checked

    def _stamps(self) -> dict[str, Any]:
        spec = self._spec
        info = spec.info
        entity = spec.entity
        stamps: dict[str, Any] = {}
        if info.version_key is not None:
            stamps[info.version_key] = getattr(entity, info.version_key) + 1
        if info.updated_key is not None:
            stamps[info.updated_key] = self._bound.clock().now()
        return stamps

    async def _run_write(self, stmt: Any, returning: bool) -> int | builtins.list[T]:
        session = self._bound.session
        options = {**self._options(), "synchronize_session": "fetch"}
        with translating(session.sync_session):
            if returning:
                result = await session.scalars(
                    stmt.returning(self._spec.entity), execution_options=options
                )
                return builtins.list(result.all())
            outcome = await session.execute(stmt, execution_options=options)
            return int(outcome.rowcount)  # type: ignore[attr-defined]

    @overload
    async def update(self, *, returning: Literal[False] = False, **values: Any) -> int: ...

    @overload
    async def update(self, *, returning: Literal[True], **values: Any) -> builtins.list[T]: ...

    async def update(self, *, returning: bool = False, **values: Any) -> int | builtins.list[T]:
        """UPDATE every matching row; return the number of rows (or the rows, ``returning``).

        Versioned tables get ``version = version + 1`` and audit tables ``updated_at``, so
        writers holding a loaded copy see a ``ConcurrencyConflict`` on their next save.

        Raises:
            InvalidQuery: no values, an unknown or qx-managed field, or a bad value.
        """
        checked = self._bulk_values(values)
        stmt = (
            update(self._spec.entity)
            .where(self._matching_pks())
            .values(**checked, **self._stamps())
        )
        return await self._run_write(stmt, returning)

    @overload
    async def delete(self, *, returning: Literal[False] = False, hard: bool = False) -> int: ...

    @overload
    async def delete(self, *, returning: Literal[True], hard: bool = False) -> builtins.list[T]: ...

    async def delete(
        self, *, returning: bool = False, hard: bool = False
    ) -> int | builtins.list[T]:
        """Delete every matching row: a soft delete (``deleted_at``) where the table has one,
        else (or with ``hard=True``) a DELETE that removes the aggregates' owned parts and
        association rows first.

        Returns the number of aggregates deleted (or the rows, ``returning``).
        """
        spec = self._spec
        info = spec.info
        entity = spec.entity
        if info.deleted_key is not None and not hard:
            deleted = getattr(entity, info.deleted_key)
            stmt = (
                update(entity)
                .where(self._matching_pks(), deleted.is_(None))
                .values({info.deleted_key: self._bound.clock().now(), **self._stamps()})
            )
            return await self._run_write(stmt, returning)
        pks = self._pk_columns()
        roots = self._pk_select()
        if len(pks) != 1:
            return await self._run_write(delete(entity).where(tuple_(*pks).in_(roots)), returning)
        session = self._bound.session
        with translating(session.sync_session):
            keys = builtins.list(
                (await session.scalars(roots, execution_options=self._options())).all()
            )
        if not keys:
            return [] if returning else 0
        await delete_owned(self._bound, spec.mapper, keys)
        condition = self._bound.dialect(spec.mapper).in_(pks[0], keys)
        return await self._run_write(delete(entity).where(condition), returning)
