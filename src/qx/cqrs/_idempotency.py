"""Idempotency keys as a contract (Stripe's keys, the IETF ``Idempotency-Key`` draft).

* A key is scoped to its caller: the request context's tenant and principal (``user_id``),
  and the command type. Another tenant using the same key runs its own command.
* A key is bound to a fingerprint of the request (the command's fields): reusing it for a
  different request is :class:`~qx.core.IdempotencyKeyReused` (HTTP 422).
* A repeat while the first is still running is :class:`~qx.core.RequestInFlight` (HTTP 409);
  a claim older than ``in_flight_timeout`` counts as abandoned (its process died) and the
  repeat runs.
* A repeat after the first committed gets the stored result; a first attempt that failed
  leaves no key behind.
* Keys expire after ``retention``; :func:`purge_idempotency_keys` deletes expired rows.

The claim is committed in a short transaction of its own before the command's unit of work
opens (so that repeats see it), and the result is written in the command's own transaction
(so it exists exactly when the command's effects do).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final

from pydantic import TypeAdapter
from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from qx.core._clock import utcnow
from qx.core._context import current_context
from qx.core._errors import IdempotencyKeyReused, RequestInFlight, shown
from qx.cqrs._table import idempotency_table as _t
from qx.db._dialect import dialect_of

__all__ = [
    "Claim",
    "IdempotencyPolicy",
    "claim_key",
    "fingerprint",
    "purge_idempotency_keys",
    "record_result",
    "release_key",
]

_RUNNING: Final = "running"
_DONE: Final = "done"


@dataclass(frozen=True, slots=True)
class IdempotencyPolicy:
    """How long idempotency keys live.

    Attributes:
        retention: seconds a key (and its result) is kept; a repeat after that runs again.
        in_flight_timeout: seconds after which a claim still marked running is taken to be
            abandoned by a process that died.
    """

    retention: float = 24 * 3600.0
    in_flight_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Claim:
    """One command's hold on its key: new (run the handler), or done (its result)."""

    tenant: str
    principal: str
    command: str
    key: str
    fingerprint: str
    created_at: datetime
    done: bool = False
    result: Any = None

    def where(self) -> Any:
        return and_(
            _t.c.tenant == self.tenant,
            _t.c.principal == self.principal,
            _t.c.command == self.command,
            _t.c.key == self.key,
        )


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(message_type: type[Any]) -> TypeAdapter[Any]:
    found = _ADAPTERS.get(message_type)
    if found is None:
        found = _ADAPTERS[message_type] = TypeAdapter(message_type)
    return found


def fingerprint(message: Any) -> str:
    """SHA-256 of the command's fields (its idempotency key left out), canonical JSON."""
    data = _adapter(type(message)).dump_python(message, mode="json")
    if isinstance(data, dict):
        data.pop("idempotency_key", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


async def claim_key(
    sessions: async_sessionmaker[AsyncSession], message: Any, policy: IdempotencyPolicy
) -> Claim:
    """Claim the message's key in a transaction of its own.

    Raises:
        IdempotencyKeyReused: the key was used for a different request.
        RequestInFlight: the first request with this key is still being handled.
    """
    ctx = current_context()
    key: str = message.idempotency_key
    command = type(message).__qualname__
    now = utcnow()
    claim = Claim(
        tenant=ctx.tenant_id or "",
        principal=ctx.user_id or "",
        command=command,
        key=key,
        fingerprint=fingerprint(message),
        created_at=now,
    )
    row = {
        "tenant": claim.tenant,
        "principal": claim.principal,
        "command": command,
        "key": key,
        "fingerprint": claim.fingerprint,
        "state": _RUNNING,
        "result": None,
        "created_at": now,
        "expires_at": now + timedelta(seconds=policy.retention),
    }
    async with sessions() as session, session.begin():
        dialect = dialect_of(session)
        inserted = await session.execute(
            dialect.insert(_t).values(row).on_conflict_do_nothing().returning(_t.c.key)
        )
        if inserted.first() is not None:
            return claim
        stmt = dialect.for_update(select(_t).where(claim.where()))
        found = (await session.execute(stmt)).first()
        if found is None or found.expires_at <= now:
            # Expired (or purged this instant): the key starts afresh.
            await session.execute(delete(_t).where(claim.where()))
            await session.execute(dialect.insert(_t).values(row))
            return claim
        if found.fingerprint != claim.fingerprint:
            raise IdempotencyKeyReused(
                f"idempotency key {shown(key)} was used for a different {command}; "
                "use a new key for a new request"
            )
        if found.state == _DONE:
            return replace(claim, done=True, result=found.result)
        if found.created_at + timedelta(seconds=policy.in_flight_timeout) > now:
            raise RequestInFlight(
                f"a {command} with idempotency key {shown(key)} is still being handled; retry later"
            )
        # Abandoned by a process that died mid-command: this repeat takes it over.
        await session.execute(update(_t).where(claim.where()).values(created_at=now))
        return claim


async def record_result(session: AsyncSession, claim: Claim, result: Any) -> None:
    """Store the command's result, in the command's own transaction."""
    await session.execute(
        update(_t)
        .where(claim.where(), _t.c.created_at == claim.created_at)
        .values(state=_DONE, result=result)
    )


async def release_key(sessions: async_sessionmaker[AsyncSession], claim: Claim) -> None:
    """Drop a claim whose command failed, so that a repeat runs it again."""
    async with sessions() as session, session.begin():
        await session.execute(
            delete(_t).where(
                claim.where(), _t.c.state == _RUNNING, _t.c.created_at == claim.created_at
            )
        )


async def purge_idempotency_keys(engine: AsyncEngine, *, batch: int = 1000) -> int:
    """Delete expired keys, ``batch`` rows per statement; return how many went."""
    total = 0
    while True:
        async with engine.begin() as conn:
            now = utcnow()
            key = tuple_(_t.c.tenant, _t.c.principal, _t.c.command, _t.c.key)
            oldest = (
                select(_t.c.tenant, _t.c.principal, _t.c.command, _t.c.key)
                .where(_t.c.expires_at <= now)
                .order_by(_t.c.expires_at)
                .limit(batch)
            )
            result = await conn.execute(delete(_t).where(key.in_(oldest)))
        deleted = int(result.rowcount)
        total += deleted
        if deleted < batch:
            return total
