"""Statements built once per query shape: :class:`StatementPlans`.

Building a SELECT from a query (its conditions, joins, order, window and loads) and having
SQLAlchemy compute its cache key cost about as much client CPU as running it. Two queries of
the same shape - the same keys, lookups, connectors, order and window, whatever the values -
build the same statement once their values are named bound parameters (see
``qx.db.query._lookups.Binding``), so the statement is built once per shape and every later
query passes its values as parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Final

from sqlalchemy.orm import Mapper

from qx.db._bounded import Bounded
from qx.db._scoping import ScopedStatement

__all__ = ["StatementPlans"]

#: Shapes kept per repository class; beyond it the plans start again (a program has a few
#: dozen shapes; generated filters could have many).
MAX_PLANS: Final = 512


class StatementPlans(Bounded[Hashable, ScopedStatement]):
    """One repository class's statements, by query shape (at most ``MAX_PLANS``)."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(MAX_PLANS)

    def plan(
        self, shape: Hashable, build: Callable[[], Any], *, rows_of: Mapper[Any] | None = None
    ) -> ScopedStatement:
        """The statement of ``shape``, built by ``build`` the first time (``rows_of``: see
        :class:`~qx.db._scoping.ScopedStatement`)."""
        return self.get_or_make(shape, lambda: ScopedStatement(build(), rows_of=rows_of))
