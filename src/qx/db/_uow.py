"""``UnitOfWork``: one transaction, its repositories, its events and its outbox rows.

``commit()`` runs, in order: collect the events recorded by every aggregate the session has
seen (new, loaded, deleted) → dispatch them to in-process handlers inside the transaction,
round after round until no handler records more (bounded by ``max_event_depth``) → flush →
the commit stages (:mod:`qx.db._pipeline`; by default the outbox, which inserts the
integration events into ``qx_outbox`` in one statement) → COMMIT → the stages' after-commit
step (the outbox wakes its relays) → after-commit hooks. A failure at any step before COMMIT
rolls everything back. Leaving the ``async with`` block without ``commit()`` rolls back.

Example:
    >>> class OrdersUnitOfWork(UnitOfWork):                        # doctest: +SKIP
    ...     orders: OrderRepository
    >>> uow_factory = UnitOfWorkFactory(OrdersUnitOfWork, session_factory,
    ...                                 dispatcher=dispatcher)     # doctest: +SKIP
    >>> async with uow_factory() as uow:                            # doctest: +SKIP
    ...     order = await uow.orders.require(order_id)
    ...     order.ship()
    ...     await uow.commit()
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, get_args, get_origin, get_type_hints

from pydantic import SecretStr
from sqlalchemy import Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from qx.core._aggregate import (
    AggregateRoot,
    RecordedEvent,
    discard_events,
    make_record,
    next_sequence,
    restore_events,
)
from qx.core._clock import Clock, SystemClock
from qx.core._context import current_context
from qx.core._dispatch import EventDispatcher
from qx.core._errors import (
    CommitOutcomeUnknown,
    ConfigurationError,
    TransientError,
    UnitOfWorkError,
)
from qx.core._events import Event, IntegrationEvent, handling_event
from qx.core._ids import new_id
from qx.core._telemetry import active_tracer, span
from qx.db._commit import (
    COMMIT_PROBE_SECONDS,
    CommitProbe,
    RowHandle,
    TransactionHandle,
    past_cancellation,
)
from qx.db._dialect import dialect_of
from qx.db._insert_new import forget_inserted, insert_new_aggregates
from qx.db._pipeline import CommitContext, CommitStage, default_stages, unclaimed
from qx.db._replicas import ConsistencyTokens, Replicas, Routing, commit_lsn
from qx.db._repository import Repository
from qx.db._session import QxSession, has_writes
from qx.db._state import UnitOfWorkState
from qx.db._tracking import renew_transient, transaction_of
from qx.db._translate import driver_error, lost_connection, translating
from qx.db._writes import WriteStatement, held_rows, send_alone, send_pending
from qx.db.query._cursor import CursorCodec

__all__ = ["UnitOfWork", "UnitOfWorkFactory", "UnitOfWorkState"]

logger = logging.getLogger("qx.uow")

R = TypeVar("R", bound=Repository[Any])
U = TypeVar("U", bound="UnitOfWork")
AfterCommit = Callable[[], Awaitable[None] | None]


_GENERIC_REPOSITORIES: dict[Any, type[Repository[Any]]] = {}
# The repositories each unit-of-work class declares, resolved once (kept here, weakly keyed,
# not on the user's class).
_DECLARED: weakref.WeakKeyDictionary[type[UnitOfWork], dict[str, type[Repository[Any]]]] = (
    weakref.WeakKeyDictionary()
)


def _is_generic_repository(hint: Any) -> bool:
    origin = get_origin(hint)
    return isinstance(origin, type) and issubclass(origin, Repository)


def _generic_repository(hint: Any) -> type[Repository[Any]]:
    """One subclass per ``Repository[X]`` annotation, shared by every unit of work."""
    found = _GENERIC_REPOSITORIES.get(hint)
    if found is None:
        (entity,) = get_args(hint)
        name = f"{getattr(entity, '__name__', 'Entity')}Repository"
        found = _GENERIC_REPOSITORIES[hint] = types.new_class(name, (hint,))
    return found


class UnitOfWork:
    """One business transaction.

    Declare repositories as annotations on a subclass (``orders: OrderRepository``); they
    are built, bound to this unit of work's session, when the block is entered.

    Args:
        session_factory: from :func:`qx.db.create_session_factory`.
        dispatcher: receives every recorded event inside the transaction.
        clock: time source for audit columns and soft deletes.
        max_event_depth: dispatch rounds allowed before ``UnitOfWorkError`` (a handler
            loop that never settles).
        cursor_codec: signs keyset-pagination cursors for this unit of work's repositories.
        stages: the commit's stages (the factory's, shared by its units of work; by
            default new instances of the installed ones: :func:`default_stages`).
        commit_probe_timeout: seconds to find out whether a transaction committed when
            the connection failed before COMMIT's answer (then ``CommitOutcomeUnknown``).
        routing: the factory's replicas and consistency-token codec.
        read_only: refuse writes; read on a replica when the routing has usable ones.
        consistency_token: read no state older than this token's commit (by default the
            request context's).

    Attributes:
        consistency_token: after a commit, when the factory has replicas, the signed token
            of that commit: give it to a read-only unit of work (through the request
            context, an HTTP header) to read your own writes on a replica.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        dispatcher: EventDispatcher | None = None,
        clock: Clock | None = None,
        max_event_depth: int = 8,
        cursor_codec: CursorCodec | None = None,
        stages: tuple[CommitStage, ...] | None = None,
        commit_probe_timeout: float = COMMIT_PROBE_SECONDS,
        routing: Routing | None = None,
        read_only: bool = False,
        consistency_token: str | None = None,
    ) -> None:
        if max_event_depth < 1:
            raise ConfigurationError(f"max_event_depth must be >= 1, got {max_event_depth}")
        if not commit_probe_timeout > 0:
            raise ConfigurationError(
                f"commit_probe_timeout must be > 0 seconds, got {commit_probe_timeout!r}"
            )
        self._probe_seconds = commit_probe_timeout
        self._routing = routing
        self._read_only = read_only
        self._after = consistency_token
        self.consistency_token: str | None = None
        self._session_factory = session_factory
        self._dispatcher = dispatcher
        self._clock = clock or SystemClock()
        self._max_depth = max_event_depth
        self.cursor_codec = cursor_codec
        self._stages = default_stages() if stages is None else stages
        self._state = UnitOfWorkState.NEW
        self._session: AsyncSession | None = None
        self._emitted: list[RecordedEvent] = []
        self._after_commit: list[AfterCommit] = []
        self._repositories: dict[type[Repository[Any]], Repository[Any]] = {}
        self._committing = False
        self._correlation_id: str | None = None
        self.events: list[Event] = []  # every event collected by the last commit, in order

    # -- declared repositories ---------------------------------------------------------------

    @classmethod
    def declared_repositories(cls) -> dict[str, type[Repository[Any]]]:
        """Return the repositories declared as annotations on this class and its bases."""
        found = _DECLARED.get(cls)
        if found is None:
            try:
                hints = get_type_hints(cls)
            except NameError as exc:
                raise ConfigurationError(
                    f"cannot resolve the repository annotations of {cls.__qualname__}: {exc}"
                ) from exc
            found = {}
            for name, hint in hints.items():
                if isinstance(hint, type) and issubclass(hint, Repository):
                    found[name] = hint
                elif _is_generic_repository(hint):
                    # ``books: Repository[Book]``: the plain repository of that class, as
                    # if the service had written ``class BookRepository(Repository[Book])``.
                    found[name] = _generic_repository(hint)
            _DECLARED[cls] = found
        return found

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a declared repository not built yet. Building
        # it on first use keeps units of work that never touch a repository cheap.
        if not name.startswith("_"):
            repo_type = type(self).declared_repositories().get(name)
            if repo_type is not None:
                if self._state is not UnitOfWorkState.ACTIVE:
                    raise UnitOfWorkError(
                        f"{type(self).__qualname__}.{name} is available inside 'async with' "
                        f"only (state: {self._state.value})"
                    )
                repo = self.repository(repo_type)
                setattr(self, name, repo)
                return repo
        raise AttributeError(name)

    def repository(self, repository_type: type[R]) -> R:
        """Return this unit of work's instance of ``repository_type`` (built on first use)."""
        self.require_active()
        repo = self._repositories.get(repository_type)
        if repo is None:
            repo = repository_type(self.session, uow=self)
            self._repositories[repository_type] = repo
        return repo  # type: ignore[return-value]

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> UnitOfWorkState:
        """The lifecycle state."""
        return self._state

    @property
    def session(self) -> AsyncSession:
        """The SQLAlchemy session (escape hatch; scoping hooks still apply)."""
        self.require_active()
        assert self._session is not None
        return self._session

    def require_active(self) -> None:
        """Raise ``UnitOfWorkError`` unless inside ``async with`` and not yet committed or
        rolled back (what every repository call checks first)."""
        if self._state is not UnitOfWorkState.ACTIVE:
            raise UnitOfWorkError(
                f"unit of work is {self._state.value}; open a new one with 'async with factory()'"
            )

    async def __aenter__(self) -> Self:
        if self._state is not UnitOfWorkState.NEW:
            raise UnitOfWorkError(
                f"a unit of work is entered once; this one is {self._state.value}"
            )
        session = await self._read_session() if self._read_only else self._session_factory()
        if not isinstance(session.sync_session, QxSession):
            await session.close()
            raise ConfigurationError(
                "UnitOfWork needs a session factory from qx.db.create_session_factory()"
            )
        record = transaction_of(session.sync_session)
        record.clock = self._clock
        record.read_only = self._read_only
        self._session = session
        self._state = UnitOfWorkState.ACTIVE
        self._correlation_id = current_context().correlation_id
        return self

    @property
    def correlation_id(self) -> str:
        """The request context's correlation id at entry, or one generated on first use."""
        if self._correlation_id is None:
            # Generated lazily: most units of work that read never need one.
            self._correlation_id = str(new_id())
        return self._correlation_id

    async def _read_session(self) -> AsyncSession:
        # A replica that has replayed what the caller has seen, else the primary in a
        # read-only transaction.
        token = self._after if self._after is not None else current_context().consistency_token
        after: int | None = None
        routing = self._routing
        if token is not None:
            if routing is None or routing.tokens is None:
                raise ConfigurationError(
                    "consistency tokens are signed with the factory's cursor secret: pass "
                    "cursor_secret= to UnitOfWorkFactory"
                )
            after = routing.tokens.read(token, tenant=current_context().tenant_id)
        if routing is not None and routing.replicas is not None:
            found = await routing.replicas.open(self._session_factory, after=after)
            if found is not None:
                return found
        session = self._session_factory()
        options = dialect_of(session).read_only_options
        if options:
            await session.connection(execution_options=options)
        return session

    async def _issue_token(self, tokens: ConsistencyTokens) -> None:
        engine = self._session_factory.kw.get("bind")
        if not isinstance(engine, AsyncEngine):
            return  # bound to a connection: an outer transaction commits, not this one
        try:
            lsn = await commit_lsn(engine)
        except Exception:  # the commit stands: without a token the next read goes anywhere
            logger.warning("reading the commit's WAL position failed", exc_info=True)
            return
        self.consistency_token = tokens.issue(lsn, tenant=current_context().tenant_id)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not UnitOfWorkState.ACTIVE and self._session is not None:
            # Committed or rolled back already: only the session's close is left, which
            # releases a connection that holds no transaction.
            await self._close()
            return
        # Cancelled while cleaning up: finish anyway so the connection returns to the pool
        # rolled back, then let the cancellation continue.
        if await past_cancellation(self._close()):
            raise asyncio.CancelledError

    async def _close(self) -> None:
        session = self._session
        try:
            if self._state is UnitOfWorkState.ACTIVE and session is not None:
                if has_writes(session.sync_session):  # type: ignore[arg-type]
                    # Discarded writes: rollback also expires the objects, so nobody reads
                    # values that never reached the database.
                    await self._rollback_quietly(session)
                else:
                    # Read-only: close() alone ends the transaction and leaves what was
                    # loaded readable after the block.
                    self._state = UnitOfWorkState.ROLLED_BACK
        finally:
            if session is not None:
                try:
                    await session.close()
                except Exception:  # pragma: no cover - connection already unusable
                    logger.exception("closing the unit of work's session failed")
            self._state = UnitOfWorkState.CLOSED

    async def _rollback_quietly(self, session: AsyncSession) -> None:
        self._state = UnitOfWorkState.ROLLED_BACK
        try:
            await session.rollback()
        except Exception:
            # A connection broken mid-statement cannot roll back; discard it so the pool
            # never hands out a connection in an unknown transaction state.
            logger.warning("rollback failed; invalidating the connection", exc_info=True)
            try:
                await session.invalidate()
            except Exception:  # pragma: no cover - nothing more to do
                logger.exception("invalidating the connection failed")

    # -- events ----------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Record an event that belongs to no aggregate (dispatched and outboxed at commit)."""
        self.require_active()
        self._emitted.append(make_record(event, None))

    def on_commit(self, callback: AfterCommit) -> None:
        """Run ``callback`` after a successful COMMIT (errors are logged, not raised)."""
        self.require_active()
        self._after_commit.append(callback)

    def _collect(self) -> list[RecordedEvent]:
        # From the transaction's own record of the roots it has seen (held strongly), never
        # from the identity map, which may already have let go of an unmodified root.
        batch, self._emitted = self._emitted, []
        sync = self.session.sync_session
        session_id = sync.hash_key
        tx = transaction_of(sync)
        tx.take_back()  # roots a stream let go of that recorded events since
        for obj in tx.roots.values():
            if (
                isinstance(obj, AggregateRoot)
                and obj.has_pending_events()
                and (instance_state(obj).session_id == session_id or id(obj) in tx.unattached)
            ):
                batch.extend(obj.collect_events())
        batch.sort(key=lambda record: record.seq)
        return batch

    async def _drain_events(self, collected: list[RecordedEvent]) -> None:
        # Appends to ``collected`` as it goes, so a failing round leaves what was taken.
        depth = 0
        while batch := self._collect():
            depth += 1
            if depth > self._max_depth:
                names = sorted({type(r.event).__qualname__ for r in batch})
                raise UnitOfWorkError(
                    f"events still being raised after {self._max_depth} dispatch rounds "
                    f"(a handler loop?); pending: {', '.join(names)}"
                )
            collected.extend(batch)
            if self._dispatcher is None:
                _warn_unhandled(batch, self._session_factory)
                break  # nothing runs that could record more events
            await dispatch_round(self._dispatcher, batch, self)

    # -- transaction -----------------------------------------------------------------------

    async def commit(self) -> None:
        """Dispatch events, run the commit stages (write the outbox), COMMIT, run the
        stages' after-commit step (wake the outbox relays), then the after-commit hooks.

        Raises:
            UnitOfWorkError: not active (committed already, rolled back, closed), called
                from an event handler, or events that never settle.
            ConfigurationError: integration events were recorded and no commit stage
                delivers them (nothing is written).
            QxError: translated database errors (``ConcurrencyConflict``,
                ``DuplicateKey``, ``TransientError``, ...); the transaction is rolled back.
        """
        if self._committing:
            raise UnitOfWorkError("commit() cannot be called while the commit is in progress")
        self.require_active()
        with span("qx.uow.commit") as current:
            records, context, written, cancelled = await self._commit()
            if current is not None:
                current.set_attributes(
                    {
                        "db.system.name": dialect_of(self.session).name,
                        "qx.uow.events": len(records),
                        **{
                            f"qx.{stage.name}.rows": rows
                            for stage, rows in zip(self._stages, written, strict=True)
                        },
                    }
                )
        self._state = UnitOfWorkState.COMMITTED
        routing = self._routing
        if (
            not self._read_only
            and routing is not None
            and routing.replicas is not None
            and routing.tokens is not None  # the factory refuses replicas without a secret
        ):
            await self._issue_token(routing.tokens)
        self.events = [record.event for record in records]
        if context is not None:
            await self._after_stages(context, written)
        await self._run_after_commit()
        if cancelled:
            # Cancelled while COMMIT was on its way: the commit stands and its bookkeeping
            # is done; the cancellation goes on to the caller.
            raise asyncio.CancelledError

    async def _after_stages(self, context: CommitContext, written: list[int]) -> None:
        for stage, rows in zip(self._stages, written, strict=True):
            if rows:
                try:
                    await stage.after_commit(context, rows)
                except Exception:
                    # The data is committed: a failing stage must not look like a failed commit.
                    logger.exception("after-commit step of stage %r failed", stage)

    def _refuse_unclaimed(self, records: list[RecordedEvent]) -> None:
        kind = unclaimed(self._stages)
        if kind is None:
            return
        for record in records:
            if isinstance(record.event, kind):
                raise ConfigurationError(
                    f"{type(record.event).__qualname__} is an integration event but this unit "
                    f"of work has no commit stage that delivers it (stages: "
                    f"{[stage.name for stage in self._stages]}): pass stages=[OutboxStage()] "
                    "from qx.outbox, or install qx with its default stages"
                )

    async def _commit(
        self,
    ) -> tuple[list[RecordedEvent], CommitContext | None, list[int], bool]:
        """The transaction part of :meth:`commit`: the events it settled, what the stages
        saw and wrote, and whether a cancellation came while COMMIT was on its way."""
        session = self.session
        sync: QxSession = session.sync_session  # type: ignore[assignment]
        self._committing = True
        before_commit = next_sequence()  # events recorded earlier have a smaller seq
        records: list[RecordedEvent] = []
        inserted: list[Any] | None = None
        context: CommitContext | None = None
        written: list[int] = [0] * len(self._stages)
        try:
            await self._drain_events(records)
            with translating(sync):
                if records or sync.new or transaction_of(sync).unattached:
                    self._refuse_unclaimed(records)
                    inserted = await insert_new_aggregates(session)
                    if inserted is None:
                        await session.flush()  # the stages may need flushed keys
                if self._stages:
                    bind = self._session_factory.kw.get("bind")
                    context = CommitContext(
                        records=records,
                        session=session,
                        engine=bind if isinstance(bind, AsyncEngine) else None,
                        _correlation=lambda: self.correlation_id,
                    )
                    for index, stage in enumerate(self._stages):
                        written[index] = await stage.before_commit(context)
                cancelled = await past_cancellation(self._commit_or_find_out(session))
        except BaseException:
            roots = list(transaction_of(sync).roots.values())  # the rollback clears the record
            _restore_events(roots, records, before_commit)
            await asyncio.shield(self._rollback_quietly(session))
            if inserted is not None:
                forget_inserted(inserted)
            renew_transient(roots)
            raise
        finally:
            self._committing = False
        return records, context, written, cancelled

    async def _commit_or_find_out(self, session: AsyncSession) -> None:
        """COMMIT. When the connection fails before COMMIT's answer, ask the database
        whether the transaction committed: if it did, return as if the answer had come; if
        it did not, raise ``TransientError`` (safe to retry); if that cannot be found out in
        time, raise ``CommitOutcomeUnknown`` (never safe to retry blindly)."""
        engine = self._session_factory.kw.get("bind")
        probe = dialect_of(engine).commit_probe if isinstance(engine, AsyncEngine) else None
        if probe is None or not isinstance(engine, AsyncEngine):
            # Nothing to find out (bound to an outer connection): the rows held back, then
            # COMMIT (which flushes what is left itself), in one trip.
            held: list[tuple[WriteStatement, list[dict[str, Any]]]] = []
            try:
                await session.run_sync(_send_and_commit, held)
            except Exception as exc:
                await _explain_absent(session, exc, held)
                raise
            return
        # The handle and COMMIT in one trip into the session's greenlet (each trip costs
        # about as much CPU as a small statement).
        taken: list[TransactionHandle | RowHandle | None] = []
        sent: list[tuple[WriteStatement, list[dict[str, Any]]]] = []
        try:
            await session.run_sync(_name_and_commit, probe, taken, sent)
        except Exception as exc:
            await _explain_absent(session, exc, sent)
            handle = taken[0] if taken else None
            if handle is None or not probe.ambiguous(exc):
                raise  # the handle failed, nothing to find out, or a plain refusal
            deadline = time.monotonic() + self._probe_seconds
            committed = await probe.outcome(engine, handle, session=session, deadline=deadline)
            if committed:
                logger.warning("the connection failed before COMMIT's answer; %s committed", handle)
                with contextlib.suppress(Exception):
                    await session.close()
                return
            if committed is False:
                raise TransientError(
                    f"the connection failed during COMMIT and {handle} did not commit; "
                    "safe to retry"
                ) from exc
            if isinstance(handle, RowHandle):
                raise CommitOutcomeUnknown(
                    f"the connection failed before the answer ({_driver_reason(exc)}) and "
                    f"whether {handle} committed is not known after {self._probe_seconds:g}s; "
                    "retrying could apply it twice"
                ) from exc
            if not handle.transaction:  # nobody to ask (an SQLite file)
                raise CommitOutcomeUnknown(
                    f"COMMIT failed in a way that may have left it committed "
                    f"({_driver_reason(exc)}); whether it did cannot be found out; retrying "
                    "could apply it twice"
                ) from exc
            raise CommitOutcomeUnknown(
                f"COMMIT failed before its answer ({_driver_reason(exc)}) and whether "
                f"transaction {handle.transaction} committed is not known after "
                f"{self._probe_seconds:g}s; retrying could apply it twice",
                transaction=handle.transaction,
            ) from exc

    async def rollback(self) -> None:
        """Roll back now; the unit of work cannot be used afterwards."""
        self.require_active()
        await asyncio.shield(self._rollback_quietly(self.session))

    async def _run_after_commit(self) -> None:
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # The data is committed: a failing hook must not look like a failed commit.
                logger.exception("after-commit hook %r failed", callback)


def _restore_events(roots: list[Any], records: list[RecordedEvent], before_commit: int) -> None:
    # A failed commit leaves the aggregates as they were before commit(), so the same
    # objects can be retried: the events they had recorded go back on them, and those that
    # handlers recorded during the commit are dropped (the handlers run again on retry).
    discard_events(roots)
    restore_events(record for record in records if record.seq < before_commit)


_UNHANDLED_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _driver_reason(error: BaseException) -> str:
    """The driver's name and text for an error, bounded (SQLite: ``SQLITE_IOERR_FSYNC: disk
    I/O error``)."""
    orig = driver_error(error)
    name = getattr(orig, "sqlite_errorname", None) or type(orig).__name__
    return f"{name}: {str(orig)[:120]}"


def _name_and_commit(
    session: Session,
    probe: CommitProbe,
    taken: list[TransactionHandle | RowHandle | None],
    sent: list[tuple[WriteStatement, list[dict[str, Any]]]],
) -> None:
    """Send the rows held back (noted in ``sent``): as the whole transaction, one statement
    without BEGIN, where they are all it writes and the backend can; else in it (their
    statement names the transaction where the backend can). Take the handle a probe asks
    about if the answer is lost (kept in ``taken`` before anything else can fail), then
    COMMIT (nothing to send after a statement that committed itself)."""
    sent.extend(held_rows(session))
    if not send_alone(session, probe.lone_handle, taken):
        send_pending(session)
        taken.append(probe.handle(session))
    session.commit()


def _send_and_commit(
    session: Session, sent: list[tuple[WriteStatement, list[dict[str, Any]]]]
) -> None:
    sent.extend(held_rows(session))
    send_pending(session)
    session.commit()


async def _explain_absent(
    session: AsyncSession,
    error: BaseException,
    sent: list[tuple[WriteStatement, list[dict[str, Any]]]],
) -> None:
    """Raise the ``ConfigurationError`` a held write asks for when its table does not
    exist and ``error`` says so (``WriteStatement.absent``: the outbox's "run qx's
    migrations"). Not for a connection that failed: that says nothing of a table, and the
    session's connection is the one that failed (the commit probe asks on a fresh one)."""
    if not isinstance(error, DBAPIError) or lost_connection(error):
        return
    for owner, _ in sent:
        table = owner.statement.table
        if owner.absent is None or not isinstance(table, Table):
            continue
        connection = await session.connection()
        if await dialect_of(connection).lacks_table(connection, error, table):
            raise ConfigurationError(owner.absent) from error


def _warn_unhandled(batch: list[RecordedEvent], session_factory: Any) -> None:
    """Say once per event class and session factory that its events reach no handler."""
    warned = _UNHANDLED_WARNED.setdefault(session_factory, set())
    for record in batch:
        if isinstance(record.event, IntegrationEvent):
            continue  # these still go to the outbox
        name = type(record.event).__qualname__
        if name in warned or len(warned) > 1000:
            continue
        warned.add(name)
        logger.warning(
            "%s was recorded but this unit of work has no dispatcher, so no handler runs: "
            "pass dispatcher= (a MessageBus or InProcessDispatcher) to UnitOfWorkFactory",
            name,
        )


async def dispatch_round(dispatcher: EventDispatcher, batch: list[RecordedEvent], uow: Any) -> None:
    """Dispatch one round of recorded events, each marked as the cause of what it raises
    (and, when tracing, in a span of its own under the commit's)."""
    traced = active_tracer() is not None  # once per round, not per event
    for record in batch:
        token = handling_event.set(record.event.event_id)
        try:
            if traced:
                name = type(record.event).__qualname__
                with span(f"qx.event.handle {name}", attributes={"qx.event.class": name}):
                    await dispatcher.dispatch(record.event, uow)
            else:
                await dispatcher.dispatch(record.event, uow)
        finally:
            handling_event.reset(token)


class UnitOfWorkFactory(Generic[U]):
    """Builds a fresh unit of work per use: ``async with factory() as uow``.

    Args:
        uow_type: the ``UnitOfWork`` subclass declaring the repositories.
        session_factory: from :func:`qx.db.create_session_factory`.
        dispatcher: event dispatcher passed to every unit of work.
        clock: time source passed to every unit of work.
        max_event_depth: dispatch rounds allowed per commit.
        cursor_secret: key signing keyset-pagination cursors (``QxSettings.pagination_secret``,
            at least 16 characters); keyset ``page()`` needs it.
        commit_probe_timeout: see :class:`UnitOfWork`.
        stages: the commit stages of every unit of work (:class:`CommitStage`); by
            default new instances of the installed ones (qx's outbox). ``()``: none, and
            a commit that recorded integration events fails.
        replicas: where read-only units of work read (:class:`Replicas`); ``None``: on
            the primary. Needs ``cursor_secret`` (it signs the consistency tokens).

    Attributes:
        stages: the stages its units of work share.
        replicas: the replicas reads go to, if any.
    """

    def __init__(
        self,
        uow_type: type[U],
        session_factory: async_sessionmaker[AsyncSession],
        *,
        dispatcher: EventDispatcher | None = None,
        clock: Clock | None = None,
        max_event_depth: int = 8,
        cursor_secret: str | bytes | SecretStr | None = None,
        commit_probe_timeout: float = COMMIT_PROBE_SECONDS,
        stages: Sequence[CommitStage] | None = None,
        replicas: Replicas | None = None,
    ) -> None:
        if not (isinstance(uow_type, type) and issubclass(uow_type, UnitOfWork)):
            raise ConfigurationError(f"expected a UnitOfWork subclass, got {uow_type!r}")
        uow_type.declared_repositories()  # fail at wiring time, not on the first request
        self.uow_type = uow_type
        self.session_factory = session_factory
        self.dispatcher = dispatcher
        self.clock = clock
        self.max_event_depth = max_event_depth
        self.cursor_codec = CursorCodec(cursor_secret) if cursor_secret is not None else None
        self.stages = default_stages() if stages is None else _checked_stages(stages)
        self.commit_probe_timeout = commit_probe_timeout
        if replicas is not None and cursor_secret is None:
            raise ConfigurationError(
                "replicas need cursor_secret= (QX_PAGINATION_SECRET): it signs the consistency "
                "tokens that let a client read its own writes on a replica"
            )
        self.replicas = replicas
        self._routing = Routing(
            replicas, ConsistencyTokens(cursor_secret) if cursor_secret is not None else None
        )

    def __call__(self) -> U:
        """Return a new, not yet entered, unit of work (read-write, on the primary)."""
        return self._make(read_only=False, token=None)

    def read_only(self, *, consistency_token: str | None = None) -> U:
        """Return a new read-only unit of work: on a replica when one is usable.

        Args:
            consistency_token: a commit's token (``uow.consistency_token``): the unit of
                work reads no older state; by default the request context's.

        Raises:
            InvalidConsistencyToken: (on entry) the token is malformed, forged or another
                tenant's.

        Example:
            >>> async with uow_factory.read_only(consistency_token=token) as uow:
            ...     order = await uow.orders.require(order_id)              # doctest: +SKIP
        """
        return self._make(read_only=True, token=consistency_token)

    def _make(self, *, read_only: bool, token: str | None) -> U:
        return self.uow_type(
            self.session_factory,
            dispatcher=self.dispatcher,
            clock=self.clock,
            max_event_depth=self.max_event_depth,
            cursor_codec=self.cursor_codec,
            stages=self.stages,
            commit_probe_timeout=self.commit_probe_timeout,
            routing=self._routing,
            read_only=read_only,
            consistency_token=token,
        )


def _checked_stages(stages: Sequence[CommitStage]) -> tuple[CommitStage, ...]:
    checked = tuple(stages)
    for stage in checked:
        if not isinstance(stage, CommitStage):
            raise ConfigurationError(f"stages: {stage!r} is not a CommitStage")
    return checked
