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

from qx.db._scoping import ScopedStatement

__all__ = ["StatementPlans"]

#: Shapes kept per repository class; beyond it the plans start again (a program has a few
#: dozen shapes; generated filters could have many).
MAX_PLANS: Final = 512


class StatementPlans:
    """One repository class's statements, by query shape."""

    __slots__ = ("_plans",)

    def __init__(self) -> None:
        self._plans: dict[Hashable, ScopedStatement] = {}

    def plan(
        self, shape: Hashable, build: Callable[[], Any], *, rows_of: Mapper[Any] | None = None
    ) -> ScopedStatement:
        """The statement of ``shape``, built by ``build`` the first time (``rows_of``: see
        :class:`~qx.db._scoping.ScopedStatement`)."""
        found = self._plans.get(shape)
        if found is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            found = self._plans[shape] = ScopedStatement(build(), rows_of=rows_of)
        return found

    def __len__(self) -> int:
        return len(self._plans)
