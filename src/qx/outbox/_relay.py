"""``OutboxRelay``: moves outbox rows to the broker, at least once, in order per aggregate.

No database transaction or lock spans broker I/O. The relay leases a fair share of the
outbox's lanes (every aggregate hashes to one lane), then loops:

1. renew its lanes (and hand surplus ones to relays that joined);
2. in one short transaction, write what finished since the last turn (published rows,
   failed heads) and claim a batch in its lanes: per aggregate, the rows from its head on;
3. publish each aggregate's rows one after the other, different aggregates concurrently,
   outside any transaction, while later turns claim and mark more.

A failed publish holds back only its own aggregate: the head is retried with jittered
exponential backoff, and after ``max_attempts`` it is dead and *parks* the aggregate (its
later rows wait, in order, until an operator requeues it) unless its event is in
``publish_past``. A broker that cannot be reached is no message's fault: rows are given back
untried and the relay waits for it. A relay that dies or loses the network costs its peers
one lease period: its lanes and in-flight rows are then taken over, and marks it makes later
are refused (fencing tokens). Brokers that deduplicate by message id (JetStream) see a
republished row once; others need the consumer's inbox.

The relay wakes on ``LISTEN qx_outbox`` (a unit of work that wrote outbox rows notifies
after its COMMIT) and polls every ``poll_interval`` as a fallback. Its states
(:class:`RelayState`: relaying, broker down, database down, stopping) are named and checked
in :mod:`qx.outbox._relay_state`. On SIGTERM/SIGINT it stops claiming, waits
up to ``shutdown_timeout`` for publishes in flight, gives back the rest and its lanes, and
returns; every database call is bounded by ``db_timeout``.

Example:
    >>> relay = OutboxRelay(engine, publisher_from_settings(settings.broker),
    ...                     settings=settings.relay)          # doctest: +SKIP
    >>> await relay.serve()                                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol
from uuid import uuid4

from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core._clock import Clock, SystemClock
from qx.core._errors import BrokerUnavailable, QxError
from qx.core._telemetry import active_tracer, span, trace_headers
from qx.db._translate import translate_error
from qx.outbox._claimed import Run
from qx.outbox._envelope import Envelope
from qx.outbox._leases import Leases
from qx.outbox._logging import RateLimitedLog
from qx.outbox._relay_state import RelayState, StateMachine
from qx.outbox._signals import pause, until_signalled
from qx.outbox._store import (
    Claim,
    Failure,
    Finished,
    Marks,
    OutboxStore,
    Sent,
    reconnect_backoff,
    retry_backoff,
)
from qx.outbox._table import NOTIFY_CHANNEL
from qx.outbox._tx import terminate
from qx.outbox.publishers._port import Described, Probed, Publisher
from qx.settings import RelaySettings

__all__ = ["BatchResult", "OutboxRelay", "RelayMetrics"]

logger = logging.getLogger("qx.outbox.relay")

#: How often a relay renews its lanes and looks for its fair share.
LEASE_INTERVAL = 1.0
#: The longest a published row waits to be marked (and its aggregate's next rows to be
#: released to the next claim).
MARK_INTERVAL = 0.02


class RelayMetrics(Protocol):
    """What the relay reports (see :mod:`qx.outbox._metrics` for Prometheus)."""

    def batch(self, result: BatchResult, seconds: float) -> None:
        """One batch finished."""


@dataclass(slots=True)
class BatchResult:
    """What one batch did.

    Attributes:
        claimed: rows claimed.
        published: rows the broker acknowledged.
        failed: rows whose publish failed (retried later).
        dead: of those, rows dead-lettered now.
        released: rows given back untried (broker unavailable, shutdown).
        lag_seconds: age of the oldest row published in this batch.
        errors: the failures' texts.
    """

    claimed: int = 0
    published: int = 0
    failed: int = 0
    dead: int = 0
    released: int = 0
    lag_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class OutboxRelay:
    """Publishes ``qx_outbox`` rows.

    Args:
        engine: the database holding the outbox (PostgreSQL: any number of relays; SQLite:
            run one).
        publisher: the broker adapter.
        settings: batch size, leases, timeouts, retries, retention.
        source: the CloudEvents ``source`` of the envelopes.
        clock: time source (tests).
        metrics: optional metrics sink.
        relay_id: this relay's name in ``qx_outbox_lane``; unique per process by default.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        *,
        settings: RelaySettings | None = None,
        source: str = "qx",
        clock: Clock | None = None,
        metrics: RelayMetrics | None = None,
        relay_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.settings = settings or RelaySettings()
        self.source = source
        self.clock = clock or SystemClock()
        self.metrics = metrics
        self.relay_id = relay_id or f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"
        self.store = OutboxStore(engine, timeout=self.settings.db_timeout)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._leases = Leases({})
        self._leased_at = -LEASE_INTERVAL
        self._lease_until = self.clock.now()
        self._marks = Marks()
        self._busy: Counter[int] = Counter()  # lane -> rows claimed and not yet recorded
        # (lane, positions) of runs done, to record; until then their rows stay in flight.
        self._settled: list[tuple[int, list[int]]] = []
        self._flying: set[int] = set()
        self._in_flight = 0
        self._recorded_at = 0.0
        self._claimed_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._outage_until = 0.0
        self._outages = 0
        self._last_purge = 0.0
        self._log = RateLimitedLog(logger)
        self._machine = StateMachine(self.relay_id)
        self._retry = retry_backoff(self.settings)
        self._reconnect = reconnect_backoff(self.settings)
        # Checked once: an isinstance() of a Protocol is slow.
        self._described = publisher if isinstance(publisher, Described) else None
        # After an outage the relay is back only when the broker answers: connect() returning
        # is no answer for a client that reconnects by itself or connects lazily.
        self._reach = publisher.probe if isinstance(publisher, Probed) else publisher.connect

    @property
    def state(self) -> RelayState:
        """Where the relay is: relaying, waiting for the broker or the database, stopping."""
        return self._machine.state

    # -- one turn ---------------------------------------------------------------------------

    async def run_once(self) -> BatchResult:
        """Lease lanes if needed, claim one batch, publish it, record it; return the result."""
        await self._renew(force=not self._leases.tokens)
        claim = await self._claim()
        result = BatchResult(claimed=claim.rows)
        if claim.rows:
            started = time.perf_counter()
            await self._publish(claim, result)
            await self._record()
            if self.metrics is not None:
                self.metrics.batch(result, time.perf_counter() - started)
        return result

    async def release(self) -> None:
        """Write what is left of the last turn and give back this relay's lanes, so another
        relay takes them at once rather than after a lease period (after :meth:`run_once`;
        :meth:`run` does it when it stops)."""
        await self._record()
        await self.store.release(self.relay_id)
        self._leases = Leases({})
        self._leased_at = -LEASE_INTERVAL

    async def _renew(self, *, force: bool = False) -> None:
        now = self.clock.now()
        half = timedelta(seconds=self.settings.lease_seconds / 2)
        recent = time.monotonic() - self._leased_at < LEASE_INTERVAL
        if not force and recent and now < self._lease_until - half:
            return
        self._leases = await self.store.lease(
            self.relay_id,
            busy={lane for lane, rows in self._busy.items() if rows},
            now=now,
            lease_seconds=self.settings.lease_seconds,
        )
        self._leased_at = time.monotonic()
        self._lease_until = now + 2 * half

    async def _claim(self) -> Claim:
        return await self._exchange(claim=True)

    async def _publish(self, claim: Claim, result: BatchResult) -> None:
        with span("qx.outbox.batch", attributes={"qx.outbox.claimed": claim.rows}) as current:
            await asyncio.gather(*(self._publish_run(run, result) for run in claim.runs))
            if current is not None:
                current.set_attributes(
                    {
                        "qx.outbox.published": result.published,
                        "qx.outbox.failed": result.failed,
                        "qx.outbox.released": result.released,
                    }
                )

    async def _publish_run(self, run: Run, result: BatchResult) -> None:
        """Publish one aggregate's rows in order; stop at the first that fails."""
        lane, key = run[0].lane, run[0].key  # one aggregate per run
        marks = self._marks
        sent = 0
        try:
            async with self._slots:
                traced = active_tracer() is not None
                for row in run:
                    if self._outage_until > time.monotonic():
                        raise BrokerUnavailable("the broker is unavailable")
                    envelope = row.envelope(source=self.source)
                    if traced:
                        await self._publish_traced(envelope)
                    else:
                        await self.publisher.publish(envelope)
                    marks.published.append(Sent(lane, row.position, key, row.aggregate_seq))
                    result.published += 1
                    sent += 1
                    age = (self.clock.now() - row.occurred_at).total_seconds()
                    result.lag_seconds = max(result.lag_seconds, age)
            self._broker_up()
            if key is not None:
                marks.finished.append(Finished(lane, key, run[-1].position))
        except asyncio.CancelledError:
            # Rows not sent were never written as in flight: leaving the in-flight set (when
            # this run is recorded) gives them back.
            result.released += len(run) - sent
            raise
        except Exception as exc:
            if _unavailable(exc):
                result.released += len(run) - sent
                self._broker_down(exc)
            else:
                self._failed(run, sent, exc, result)
        finally:
            self._settled.append((lane, [row.position for row in run]))
            self._in_flight -= len(run)
            if self._room() or len(self._marks) >= self.settings.batch_size:
                self._wake.set()

    async def _publish_traced(self, envelope: Envelope) -> None:
        """Publish in a producer span that continues the trace the row was committed in, and
        hand the span's context on to consumers in the envelope."""
        described = self._described
        destination = described.destination(envelope) if described else envelope.type
        with span(
            f"send {destination}",
            kind="producer",
            attributes={
                "messaging.system": described.messaging_system if described else "unknown",
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": destination,
                "messaging.message.id": str(envelope.id),
                "qx.event.type": envelope.type,
                "qx.outbox.position": envelope.position or 0,
            },
            carrier=envelope.trace_context(),
        ):
            await self.publisher.publish(envelope.continued(trace_headers()))

    def _failed(self, run: Run, index: int, exc: Exception, result: BatchResult) -> None:
        row, error = run[index], _describe(exc)
        attempts = row.attempts + 1
        settings = self.settings
        dead = attempts >= settings.max_attempts
        delay = self._retry.delay(attempts)
        failure = Failure(
            row=row,
            attempts=attempts,
            error=error[:2000],
            retry_at=self.clock.now() + timedelta(seconds=delay),
            dead=dead,
            parks=row.event_name not in settings.publish_past,
            behind=tuple(r.position for r in run[index + 1 :]),
        )
        self._marks.failed.append(failure)
        result.failed += 1
        result.errors.append(error)
        if dead:
            result.dead += 1
            self._log.error(
                f"dead:{row.event_name}",
                "outbox row %s (%s, aggregate %s/%s) dead after %s attempts%s: %s",
                row.id,
                row.event_name,
                row.aggregate_type,
                row.aggregate_id,
                attempts,
                "; its aggregate is parked until requeued" if failure.parks else "",
                error,
            )
        else:
            self._log.warning(
                f"failed:{row.event_name}",
                "publishing outbox row %s (%s) failed (attempt %s): %s",
                row.id,
                row.event_name,
                attempts,
                error,
            )

    def _broker_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now < self._outage_until:
            return  # the same outage, seen by another run of the batch
        self._outages += 1
        delay = self._reconnect.delay(self._outages)
        self._outage_until = now + delay
        if self._machine.running:
            self._machine.to(RelayState.BROKER_DOWN, _describe(exc))
        self._log.warning(
            "broker", "broker unavailable (%s); rows wait untried, next try in %.1fs", exc, delay
        )

    def _broker_up(self, how: str = "the broker acknowledged") -> None:
        self._outages = 0
        if self._machine.state is RelayState.BROKER_DOWN:
            self._machine.to(RelayState.RELAYING, how)

    async def _record(self) -> None:
        """Write the marks gathered so far (one short transaction)."""
        if self._marks or self._settled:
            await self._exchange(claim=False)

    async def _exchange(self, *, claim: bool) -> Claim:
        """One short transaction: write the marks gathered so far, then (``claim``) lease
        the next batch. Marks that could not be written stay queued for the next turn (a
        lease that runs out meanwhile means the new owner publishes those rows again,
        deduplicated by id)."""
        marks, settled = self._marks.take(), self._settled
        self._settled = []
        self._recorded_at = time.monotonic()
        lost: set[int] = set()
        got = Claim([], {})
        try:
            async with self.store.hot() as tx:
                now = self.clock.now()
                if marks:
                    lost = await self.store.record(
                        self.relay_id, self._leases.tokens, marks, now=now, tx=tx
                    )
                if claim:
                    got = await self.store.claim(
                        self.relay_id,
                        {k: v for k, v in self._leases.tokens.items() if k not in lost},
                        batch_size=self.settings.batch_size,
                        now=now,
                        lease_seconds=self.settings.lease_seconds,
                        exclude=self._leases.draining,
                        run_length=self.settings.run_length,
                        skip=self._flying,
                        tx=tx,
                    )
        except BaseException:
            self._marks.put_back(marks)
            self._settled[:0] = settled
            raise
        if lost:
            self._log.warning(
                "lost", "lanes %s were taken over; their rows go out again", sorted(lost)
            )
            self._leases = Leases(
                {k: v for k, v in self._leases.tokens.items() if k not in lost},
                self._leases.draining,
            )
        for lane, positions in settled:
            self._busy[lane] -= len(positions)
            if self._busy[lane] <= 0:
                del self._busy[lane]
            self._flying.difference_update(positions)
        for run in got.runs:
            self._busy[run[0].lane] += len(run)
            self._flying.update(row.position for row in run)
        self._in_flight += got.rows
        return got

    # -- the loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the relay to stop: no new claims; publishes in flight get ``shutdown_timeout``."""
        if self._machine.running:
            self._machine.to(RelayState.STOPPING)
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    async def serve(self, *, ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM or SIGINT, then stop within ``shutdown_timeout`` plus two
        ``db_timeout`` periods, whatever state the database and the broker are in.

        Args:
            ready: called once the signal handlers are in place.
        """
        await until_signalled(self.run, self.stop, ready)

    async def run(self) -> None:
        """Relay until :meth:`stop`; ride out database and broker outages."""
        listener = asyncio.create_task(self._listen()) if self.store.sql.listens else None
        failures = 0
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    await self._turn()
                    failures = 0
                except Exception as exc:
                    failures += 1
                    delay = self._reconnect.delay(failures)
                    reason = _describe(exc)
                    if self._machine.running:
                        self._machine.to(RelayState.DATABASE_DOWN, reason)
                    self._log.warning(
                        "turn", "relay turn failed (%s); retrying in %.1fs", reason, delay
                    )
                    await pause(self._stop, delay)
                    continue
                if self._machine.state in (RelayState.STARTING, RelayState.DATABASE_DOWN):
                    down = self._outage_until > time.monotonic()
                    self._machine.to(RelayState.BROKER_DOWN if down else RelayState.RELAYING)
                await pause(self._wake, self._idle_seconds())
        finally:
            await self._shutdown(listener)

    def _room(self) -> bool:
        """Whether a whole batch fits in flight (or nothing is in flight)."""
        capacity = self.settings.batch_size * self.settings.pipelines
        return self._in_flight == 0 or capacity - self._in_flight >= self.settings.batch_size

    def _marks_due(self) -> bool:
        """Whether to write marks now: they pile up to a batch, or wait at most
        ``MARK_INTERVAL``, or a claim is coming anyway."""
        if not self._marks and not self._settled:
            return False
        waited = time.monotonic() - self._recorded_at >= MARK_INTERVAL
        return waited or self._room() or len(self._marks) >= self.settings.batch_size

    async def _turn(self) -> None:
        await self._renew()
        claimed = False
        if self._outage_until <= time.monotonic():
            while self._room() and not self._stop.is_set():
                down = self._machine.state is RelayState.BROKER_DOWN
                connect = self._reach if down else self.publisher.connect
                try:
                    await asyncio.wait_for(connect(), self.settings.connect_timeout)
                except Exception as exc:
                    self._broker_down(exc)  # rows wait in the table, untried
                    break
                if down:
                    self._broker_up("the broker answered")
                self._claimed_at = time.monotonic()
                claim = await self._claim()  # with the marks gathered so far
                claimed = True
                if claim.rows:
                    self._spawn(claim)
                if claim.rows < self.settings.batch_size:
                    break
        if not claimed and self._marks_due():
            await self._record()
        await self._maybe_purge()

    def _idle_seconds(self) -> float:
        now = time.monotonic()
        if self._outage_until > now:
            wait = self._outage_until - now  # nothing is claimed before the broker is back
        elif not self._room():
            wait = self.settings.poll_interval  # a run that finishes makes room, and wakes us
        else:
            # The poll counts from the last claim, not from the end of the last turn: a row
            # committed unannounced waits one poll interval at most, however long turns take.
            wait = max(self.settings.poll_interval - (now - self._claimed_at), 0.0)
        if self._marks or self._settled:
            wait = min(wait, max(MARK_INTERVAL - (now - self._recorded_at), 0.0))
        wait = min(wait, max(LEASE_INTERVAL - (now - self._leased_at), 0.01))
        return max(wait, 0.0)

    def _spawn(self, claim: Claim) -> None:
        result = BatchResult(claimed=claim.rows)
        started = time.perf_counter()

        async def publish() -> None:
            await self._publish(claim, result)
            if self.metrics is not None:
                self.metrics.batch(result, time.perf_counter() - started)

        task = asyncio.create_task(publish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self, listener: asyncio.Task[None] | None) -> None:
        if self._machine.running:  # cancelled rather than stopped
            self._machine.to(RelayState.STOPPING, "cancelled")
        tasks = set(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        try:
            with contextlib.suppress(Exception):  # a failed first try leaves them queued
                await self._record()
            await self.release()
        except Exception as exc:
            self._log.warning("shutdown", "could not give back lanes (%s)", _describe(exc))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publisher.close(), self.settings.connect_timeout)
        self._machine.to(RelayState.STOPPED)

    async def _maybe_purge(self) -> None:
        retention = self.settings.retention
        if retention is None or time.monotonic() - self._last_purge < 60.0:
            return
        self._last_purge = time.monotonic()
        cutoff = self.clock.now() - timedelta(seconds=retention)
        purged = await self.store.purge(older_than=cutoff, batch_size=self.settings.purge_batch)
        if purged:
            logger.info("purged %s published outbox rows older than %s", purged, cutoff)

    async def _listen(self) -> None:
        """Hold a LISTEN connection; re-establish it when it drops."""
        while not self._stop.is_set():
            raw: Any = None
            try:
                async with self.engine.connect() as conn:
                    try:
                        async with asyncio.timeout(self.settings.db_timeout):
                            raw = await conn.get_raw_connection()
                            driver = raw.driver_connection
                            assert driver is not None
                            lost = asyncio.Event()
                            driver.add_termination_listener(_setter(lost))
                            await driver.add_listener(NOTIFY_CHANNEL, self._notified)
                        self._notified()  # catch up on anything committed while not listening
                        await lost.wait()
                    finally:
                        # A dedicated connection: never hand it back to the pool, where a
                        # dead socket would hang the next user's reset.
                        terminate(raw)
                        with contextlib.suppress(Exception):
                            await conn.invalidate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info("LISTEN %s lost (%s); polling meanwhile", NOTIFY_CHANNEL, exc)
            await pause(self._stop, self.settings.reconnect_delay)

    def _notified(self, *_args: Any) -> None:
        self._wake.set()


def _setter(flag: asyncio.Event) -> Any:
    def callback(*_args: Any) -> None:
        flag.set()

    return callback


def _unavailable(exc: BaseException) -> bool:
    """The broker could not be reached (as opposed to refusing this message)."""
    if isinstance(exc, BrokerUnavailable):
        return True
    return not isinstance(exc, QxError) and isinstance(exc, ConnectionError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, QxError):
        return str(exc)
    translated = translate_error(exc) if isinstance(exc, Exception) else None
    if translated is not None:
        return str(translated)
    return f"{type(exc).__name__}: {exc}"
