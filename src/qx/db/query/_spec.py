"""What a query may touch (:class:`QuerySpec`) and where it runs (:class:`Bound`).

A ``QuerySet`` and the set-based writes get these two explicit objects from their repository
instead of reaching into it: the spec is fixed per repository class (mapping, entity info,
allow-lists, limits, default sort), the binding per unit of work (its session, checked
alive on every use, the dialect, the clock, the cursor codec).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import ColumnElement

from qx.core._clock import Clock
from qx.core._errors import ConfigurationError, UnitOfWorkError
from qx.db._bounded import Bounded
from qx.db._dialect import dialect_named
from qx.db._dialect_base import Dialect
from qx.db._model import EntityInfo
from qx.db._scoping import checks_rows_in_python
from qx.db._tracking import transaction_of
from qx.db.query._cursor import CursorCodec
from qx.db.query._keyset import SortKey, order_clauses, resolve_sort
from qx.db.query._plans import StatementPlans

if TYPE_CHECKING:
    from qx.db._session import QxSession

__all__ = ["MAX_SORTS", "Bound", "Owner", "QuerySpec"]

#: Resolved sorts kept per repository class.
MAX_SORTS = 256


class Owner(Protocol):
    """What a repository needs of the unit of work that owns its session."""

    cursor_codec: CursorCodec | None

    def require_active(self) -> None:
        """Raise ``UnitOfWorkError`` unless the unit of work is inside its ``async with``."""


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """Everything about one repository class that its queries depend on.

    Attributes:
        entity: the mapped class.
        mapper: its mapper.
        info: qx's roles of its columns and relationships.
        owner: the repository's name, for messages.
        filterable: field paths accepted as filters.
        sortable: fields accepted as sort keys.
        default_sort: the sort when none is given (the primary key last).
        max_limit: the largest ``limit`` or page size.
        default_order: the ORDER BY clauses of ``default_sort``, built once (SQL expressions
            are immutable; building them is a third of a query's own CPU).
        plans: the statements of its queries, built once per shape.
        rows_checked: every relationship of the entity loads in statements of its own
            (``checks_rows_in_python``): a query reading the entity's rows alone is scoped
            by a plain WHERE, its relationship loads by ``RowsChecked``.
        sorts: resolved sorts by the keys as written (an API sorts by a few, on every
            request); at most ``MAX_SORTS``, as they may come from HTTP input.
    """

    entity: type[Any]
    mapper: Mapper[Any]
    info: EntityInfo
    owner: str
    filterable: frozenset[str]
    sortable: frozenset[str]
    default_sort: tuple[SortKey, ...]
    max_limit: int
    default_order: tuple[ColumnElement[Any], ...] = field(init=False, repr=False, compare=False)
    plans: StatementPlans = field(init=False, repr=False, compare=False)
    rows_checked: bool = field(init=False, repr=False, compare=False)
    sorts: Bounded[str | tuple[str, ...], tuple[SortKey, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        order = tuple(order_clauses(self.entity, self.default_sort))
        object.__setattr__(self, "default_order", order)  # frozen: set once, here
        object.__setattr__(self, "plans", StatementPlans())
        object.__setattr__(self, "rows_checked", checks_rows_in_python(self.mapper))
        object.__setattr__(self, "sorts", Bounded(MAX_SORTS))

    def sort_keys(self, spec: str | Sequence[str] | None) -> tuple[SortKey, ...]:
        """Resolve a caller's sort (``"-created_at,name"``) against ``sortable``."""

        def resolved() -> tuple[SortKey, ...]:
            return resolve_sort(self.mapper, spec, allowed=self.sortable, owner=self.owner)

        written = _written(spec)
        return resolved() if written is None else self.sorts.get_or_make(written, resolved)


def _written(spec: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    # The sort as a key for QuerySpec.sorts (a string and a list of strings are different
    # keys: only a string is split on commas); None (not kept) for anything else.
    if isinstance(spec, str):
        return spec
    if isinstance(spec, list | tuple) and all(type(key) is str for key in spec):
        return tuple(spec)
    return None


class Bound:
    """Where one repository's statements run: a unit of work's session and what goes with it.

    The session is reached through :attr:`session` only, which checks that the owning unit
    of work is still active: the one lifecycle check every read and write passes.

    The owner is held weakly. A unit of work holds its repositories, so a strong reference
    back would make every unit of work that used one a reference cycle, freed by the
    cyclic collector instead of when its block ends (with its session, identity map and
    transaction state). A repository outliving its unit of work meets a closed one.
    """

    __slots__ = ("_codec", "_dialect", "_owner", "_session")

    def __init__(
        self, session: AsyncSession, owner: Owner | None, codec: CursorCodec | None
    ) -> None:
        self._session = session
        self._owner = weakref.ref(owner) if owner is not None else None
        self._codec = codec
        self._dialect: Dialect | None = None

    @property
    def session(self) -> AsyncSession:
        """The session, once the owning unit of work is known to be active."""
        if self._owner is not None:
            owner = self._owner()
            if owner is None:
                raise UnitOfWorkError(
                    "this repository's unit of work has ended: use repositories inside "
                    "its 'async with' block"
                )
            owner.require_active()
        return self._session

    @property
    def sync(self) -> QxSession:
        """The session's synchronous ``QxSession`` (after the same check)."""
        found: QxSession = self.session.sync_session  # type: ignore[assignment]
        return found

    def dialect(self, mapper: Mapper[Any]) -> Dialect:
        """The dialect the session's statements on ``mapper`` run on."""
        if self._dialect is None:
            bind = self._session.sync_session.get_bind(mapper)
            self._dialect = dialect_named(bind.dialect.name)
        return self._dialect

    def for_update(self, stmt: Any, mapper: Mapper[Any], *, of: Any = None) -> Any:
        """``stmt`` locking the rows it reads, where the backend locks rows.

        Raises:
            UnitOfWorkError: the unit of work is read-only (it may be on a replica, where
                nothing can be locked; lock in the unit of work that writes).
        """
        self.require_lockable()
        return self.dialect(mapper).for_update(stmt, of=of)

    def require_lockable(self) -> None:
        """Raise ``UnitOfWorkError`` if the unit of work is read-only (see :meth:`for_update`)."""
        if transaction_of(self.sync).read_only:
            raise UnitOfWorkError(
                "a read-only unit of work cannot lock rows (for_update): lock them in the "
                "read-write unit of work that changes them"
            )

    def clock(self) -> Clock:
        """The clock of audit columns and soft deletes."""
        return transaction_of(self.sync).clock

    def cursor_codec(self) -> CursorCodec:
        """The codec signing keyset cursors.

        Raises:
            ConfigurationError: no cursor secret was configured.
        """
        owner = self._owner() if self._owner is not None else None
        codec = self._codec or (owner.cursor_codec if owner is not None else None)
        if codec is None:
            raise ConfigurationError(
                "keyset pagination needs a cursor secret: pass cursor_secret= to "
                "UnitOfWorkFactory (for example QxSettings().pagination_secret, set with "
                "QX_PAGINATION_SECRET)"
            )
        return codec
