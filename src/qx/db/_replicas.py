"""Reads on streaming replicas, chosen by weight and by what each replica has replayed.

A read-only unit of work (``uow_factory.read_only()``) asks :class:`Replicas` for a session.
Candidates come in smooth weighted round-robin order (weights 1:3 give exactly one read in
four to the first); a replica that refused a connection is skipped for ``retry`` seconds.
On the connection it is given, one statement observes the replica: the WAL position it has
replayed and, when it is behind what it received, how old its last replayed commit is.

* Without a consistency token, a replica more than ``max_lag`` seconds behind is skipped.
* With one, the replica must have replayed past the token's LSN: it is asked again every few
  milliseconds up to ``wait`` seconds; then the read goes to the primary. Never stale.

When no replica is usable the unit of work reads on the primary, in a read-only transaction,
and the fallback is logged and counted (:attr:`Replicas.fallbacks`).

A :class:`ConsistencyTokens` codec makes the token a committed unit of work exposes: its
commit's WAL position and the tenant, signed (HMAC-SHA256), so a client can neither forge one
nor use another tenant's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from qx.core._errors import ConfigurationError, InvalidConsistencyToken
from qx.db._dialect import dialect_of
from qx.db._driver import fetch_row
from qx.db._signing import BadSeal, Signer, key_of

__all__ = ["ConsistencyTokens", "Replica", "Replicas", "Routing", "commit_lsn"]

logger = logging.getLogger("qx.db.replicas")

# The replayed position (bytes from 0/0) and the replay lag in seconds: the age of the last
# replayed commit while more has been received (0 when everything received is replayed, or
# nothing was replayed since the standby started; a promoted standby is a primary: its own
# position, no lag). An estimate, as every lag figure is; token reads compare positions.
_OBSERVE: Final = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn,"
    " CASE WHEN NOT pg_is_in_recovery()"
    " OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) END"
)
MAX_TOKEN: Final = 512


@dataclass(eq=False)
class Replica:
    """One replica: its engine, weight and what was last observed of it.

    Attributes:
        name: ``host:port`` (for logs and metrics).
        engine: its engine.
        weight: its share of the reads (0: none while others are usable).
        served: read-only units of work it served.
        down_until: ``time.monotonic()`` before which it is not tried again.
    """

    name: str
    engine: AsyncEngine
    weight: int
    served: int = 0
    down_until: float = 0.0
    _current: int = 0


class Replicas:
    """The replicas reads may go to, and how far each may lag.

    Args:
        replicas: ``(engine, weight)`` pairs.
        max_lag: seconds a replica may be behind for a read without a token.
        wait: seconds a read with a token waits for a replica to replay it before it goes
            to the primary.
        retry: seconds a replica that refused a connection is left out.

    Attributes:
        fallbacks: reads that went to the primary because no replica was usable.

    Example:
        >>> replicas = Replicas([(replica_engine, 1)], max_lag=5.0)        # doctest: +SKIP
        >>> factory = UnitOfWorkFactory(Orders, sessions, replicas=replicas,
        ...                             cursor_secret=secret)               # doctest: +SKIP
        >>> async with factory.read_only(token=token) as uow: ...           # doctest: +SKIP
    """

    def __init__(
        self,
        replicas: Sequence[tuple[AsyncEngine, int]],
        *,
        max_lag: float = 10.0,
        wait: float = 1.0,
        retry: float = 5.0,
    ) -> None:
        if not replicas:
            raise ConfigurationError("Replicas needs at least one (engine, weight)")
        found: list[Replica] = []
        for engine, weight in replicas:
            if not isinstance(weight, int) or weight < 0:
                raise ConfigurationError(f"replica weight must be an integer >= 0, got {weight!r}")
            if not dialect_of(engine).replicates:
                raise ConfigurationError(
                    f"replicas are PostgreSQL streaming standbys, got {engine.dialect.name}"
                )
            url = engine.url
            found.append(Replica(f"{url.host}:{url.port or 5432}", engine, weight))
        if not any(r.weight for r in found):
            raise ConfigurationError("at least one replica needs a weight above 0")
        for name, value in (("max_lag", max_lag), ("wait", wait), ("retry", retry)):
            if not value >= 0:
                raise ConfigurationError(f"Replicas {name} must be >= 0 seconds, got {value!r}")
        self.replicas: tuple[Replica, ...] = tuple(found)
        self.max_lag = max_lag
        self.wait = wait
        self.retry = retry
        self.fallbacks = 0

    @classmethod
    def from_settings(cls, settings: Any) -> Replicas | None:
        """The replicas ``QX_DB__REPLICAS`` names (``None`` when it names none).

        Each gets the primary's settings with its own URL and pool.
        """
        from qx.db._engine import create_engine

        if not settings.replicas:
            return None
        engines = [
            (
                create_engine(
                    settings.model_copy(
                        update={
                            "url": replica.url,
                            "pool_size": replica.pool_size,
                            "max_overflow": replica.max_overflow,
                            "pool_timeout": replica.pool_timeout,
                            "replicas": [],
                        }
                    )
                ),
                replica.weight,
            )
            for replica in settings.replicas
        ]
        return cls(
            engines,
            max_lag=settings.replica_max_lag,
            wait=settings.replica_wait,
            retry=settings.replica_retry,
        )

    async def dispose(self) -> None:
        """Close every replica's pool."""
        for replica in self.replicas:
            await replica.engine.dispose()

    def _candidates(self) -> list[Replica]:
        # Smooth weighted round-robin over the replicas not known to be down: the pick first,
        # then the others by weight (the fallbacks if the pick fails).
        now = time.monotonic()
        usable = [r for r in self.replicas if r.down_until <= now and r.weight > 0]
        if not usable:
            return []
        total = sum(r.weight for r in usable)
        for replica in usable:
            replica._current += replica.weight
        chosen = max(usable, key=lambda r: r._current)
        chosen._current -= total
        rest = sorted((r for r in usable if r is not chosen), key=lambda r: -r.weight)
        return [chosen, *rest]

    async def open(
        self, session_factory: Callable[..., AsyncSession], *, after: int | None
    ) -> AsyncSession | None:
        """A session on a usable replica (its connection taken), or ``None``: read on the
        primary.

        Args:
            session_factory: makes the session, bound to the replica's engine.
            after: the WAL position the replica must have replayed (a token's), if any.
        """
        deadline = time.monotonic() + self.wait
        for replica in self._candidates():
            session = session_factory(bind=replica.engine)
            try:
                if await self._usable(session, replica, after, deadline):
                    replica.served += 1
                    return session
            except Exception as exc:
                replica.down_until = time.monotonic() + self.retry
                logger.warning("replica %s left out for %ss: %s", replica.name, self.retry, exc)
            await _close_quietly(session)
        self.fallbacks += 1
        logger.warning(
            "no replica usable (%s): reading on the primary",
            "none replayed the token in time" if after is not None else "down or lagging",
        )
        return None

    async def _usable(
        self, session: AsyncSession, replica: Replica, after: int | None, deadline: float
    ) -> bool:
        pause = 0.005
        while True:
            position, lag = await session.run_sync(_observe)
            if after is None:
                if lag <= self.max_lag:
                    return True
                logger.info("replica %s is %.1fs behind: skipped", replica.name, lag)
                return False
            if position >= after:
                return True
            if time.monotonic() + pause > deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


def _observe(session: Session) -> tuple[int, float]:
    row = fetch_row(session, _OBSERVE)
    return int(row[0]), float(row[1])


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await session.close()
    except Exception:
        await session.invalidate()


async def commit_lsn(engine: AsyncEngine) -> int:
    """The primary's WAL position now: at or after every commit that has returned."""
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        value = await driver.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    return int(value)


class ConsistencyTokens:
    """Signs and reads consistency tokens: a commit's WAL position and its tenant.

    Args:
        secret: the factory's cursor secret; tokens are signed with a key derived from it
            for this purpose only.

    Example:
        >>> tokens = ConsistencyTokens("a-secret-of-at-least-16-chars")
        >>> tokens.read(tokens.issue(1234, tenant="t1"), tenant="t1")
        1234
    """

    __slots__ = ("_signer",)

    def __init__(self, secret: str | bytes | SecretStr) -> None:
        self._signer = Signer(key_of(secret), purpose=b"qx consistency token")

    def issue(self, lsn: int, *, tenant: str | None) -> str:
        """The token of a commit at ``lsn`` made for ``tenant``."""
        body = json.dumps({"l": lsn, "t": tenant}, separators=(",", ":")).encode("utf-8")
        return self._signer.seal(body)

    def read(self, token: object, *, tenant: str | None) -> int:
        """The WAL position ``token`` names, if it is genuine and ``tenant``'s.

        Raises:
            InvalidConsistencyToken: malformed, forged, signed with another secret, or made
                for another tenant.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise InvalidConsistencyToken("invalid consistency token", field="consistency_token")
        try:
            body = self._signer.open(token)
        except BadSeal:
            raise InvalidConsistencyToken(
                "invalid consistency token: malformed or not signed by this service",
                field="consistency_token",
            ) from None
        payload = json.loads(body)  # signed, so ours
        if payload.get("t") != tenant:
            raise InvalidConsistencyToken(
                "consistency token belongs to another tenant", field="consistency_token"
            )
        lsn: int = payload["l"]
        return lsn


@dataclass(frozen=True, slots=True)
class Routing:
    """A factory's routing, shared by its units of work: where read-only ones read, and the
    codec of consistency tokens (``None``: no cursor secret to sign them with)."""

    replicas: Replicas | None
    tokens: ConsistencyTokens | None
