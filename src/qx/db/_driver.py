"""A question asked on the driver's own connection under a session.

qx asks a few bookkeeping questions inside a unit of work (the transaction's name before
COMMIT, a replica's replay position): no SQLAlchemy statement is built for them, so the
session's hooks (tenant scoping, statement tracking) neither run nor need to, and the
question costs what the driver's round trip costs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

__all__ = ["fetch_row"]


def fetch_row(session: Session, sql: str) -> Any:
    """The first row of ``sql`` on the session's connection (inside ``run_sync``: the
    session's greenlet)."""
    fairy: Any = session.connection().connection
    return await_only(fairy.driver_connection.fetchrow(sql))
