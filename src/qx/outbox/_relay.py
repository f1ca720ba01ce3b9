"""``OutboxRelay``: moves outbox rows to the broker, at least once, in order per aggregate.

One batch: claim due rows (heads of their aggregates, locked on PostgreSQL) → publish each
aggregate's rows one after the other, different aggregates concurrently → wait for the
broker's acknowledgements → mark the published rows, and give failed ones ``attempts``,
``last_error`` and an exponential, jittered ``next_attempt_at`` (dead-lettered after
``max_attempts``) → commit. A failed row holds back only the later rows of its own
aggregate. If the relay dies mid-batch, the transaction rolls back and the rows are
published again by the next relay: brokers that deduplicate by message id (JetStream) see
them once, others need the consumer's inbox.

The relay wakes on ``LISTEN qx_outbox`` (a trigger notifies when an outbox insert commits)
and polls every ``poll_interval`` as a fallback. It survives the database and the broker
going away, and on SIGTERM/SIGINT finishes the batch in flight before it stops.

Example:
    >>> relay = OutboxRelay(engine, publisher_from_settings(settings.broker),
    ...                     settings=settings.relay)          # doctest: +SKIP
    >>> await relay.serve()                                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core._clock import Clock, SystemClock
from qx.core._errors import QxError
from qx.db._translate import translate_error
from qx.outbox._envelope import Envelope
from qx.outbox._store import Failure, OutboxBatch, OutboxStore
from qx.outbox._table import NOTIFY_CHANNEL
from qx.outbox.publishers._port import Publisher, publish_many
from qx.settings import RelaySettings

__all__ = ["BatchResult", "OutboxRelay", "RelayMetrics"]

logger = logging.getLogger("qx.outbox._relay")


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
        lag_seconds: age of the oldest row published in this batch.
    """

    claimed: int = 0
    published: int = 0
    failed: int = 0
    dead: int = 0
    lag_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class OutboxRelay:
    """Publishes ``qx_outbox`` rows.

    Args:
        engine: the database holding the outbox (PostgreSQL: any number of relays; SQLite:
            run one).
        publisher: the broker adapter.
        settings: batch size, polling, retries, retention.
        source: the CloudEvents ``source`` of the envelopes.
        clock: time source (tests).
        metrics: optional metrics sink.
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
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.settings = settings or RelaySettings()
        self.source = source
        self.clock = clock or SystemClock()
        self.metrics = metrics
        self.store = OutboxStore(engine)
        self._stop = asyncio.Event()
        self._wakes: list[asyncio.Event] = []
        self._last_purge = 0.0

    # -- one batch --------------------------------------------------------------------------

    async def run_once(self) -> BatchResult:
        """Claim, publish and mark one batch; return what happened."""
        started = time.perf_counter()
        size = self.settings.batch_size
        if self.store.locking:
            # Heads stay locked while publishing, so other relays skip these aggregates.
            async with self.store.batch() as batch:
                rows = await batch.claim(batch_size=size, now=self.clock.now())
                result = await self._publish(rows)
                await self._record(batch, result)
        else:
            # SQLite: one relay, and no write lock held while the broker is slow.
            async with self.store.batch() as batch:
                rows = await batch.claim(batch_size=size, now=self.clock.now())
            result = await self._publish(rows)
            if rows:
                async with self.store.batch() as batch:
                    await self._record(batch, result)
        if self.metrics is not None and rows:
            self.metrics.batch(result.summary, time.perf_counter() - started)
        return result.summary

    async def _publish(self, rows: list[Mapping[str, Any]]) -> _Outcome:
        """Publish in waves: the first pending row of every aggregate, then the second of
        those whose first was acknowledged, and so on. Each wave goes out as one pipelined
        batch, and no row is sent before its aggregate's previous row is acknowledged."""
        outcome = _Outcome(BatchResult(claimed=len(rows)))
        groups: dict[Any, list[Mapping[str, Any]]] = {}
        for row in rows:
            key = (
                (row["aggregate_type"], row["aggregate_id"])
                if row["aggregate_id"] is not None
                else row["position"]
            )
            groups.setdefault(key, []).append(row)
        active = list(groups.values())
        depth = 0
        size = self.settings.concurrency
        while active:
            following: list[list[Mapping[str, Any]]] = []
            for start in range(0, len(active), size):
                chunk = active[start : start + size]
                wave = [group[depth] for group in chunk]
                try:
                    envelopes = [Envelope.from_row(row, source=self.source) for row in wave]
                    errors = await publish_many(self.publisher, envelopes)
                except Exception as exc:  # a broken publisher fails the whole wave
                    errors = [exc] * len(wave)
                for group, row, error in zip(chunk, wave, errors, strict=True):
                    if error is None:
                        outcome.published.append(row)
                        if len(group) > depth + 1:
                            following.append(group)
                    else:  # a failed row holds back its aggregate only
                        outcome.failed.append((row, _describe(error)))
            active = following
            depth += 1
        return outcome

    async def _record(self, batch: OutboxBatch, outcome: _Outcome) -> None:
        now = self.clock.now()
        summary = outcome.summary
        await batch.mark_published([r["position"] for r in outcome.published], now=now)
        summary.published = len(outcome.published)
        if outcome.published:
            oldest = min(r["occurred_at"] for r in outcome.published)
            summary.lag_seconds = max((now - oldest).total_seconds(), 0.0)
        for row, error in outcome.failed:
            failure = Failure.of(row, error, now=now, settings=self.settings)
            await batch.mark_failed(failure)
            summary.failed += 1
            summary.errors.append(error)
            if failure.dead_at is not None:
                summary.dead += 1
                logger.error(
                    "outbox row %s (%s) dead-lettered after %s attempts: %s",
                    row["id"],
                    row["event_name"],
                    failure.attempts,
                    error,
                )
            else:
                logger.warning("publishing outbox row %s failed: %s", row["id"], error)

    # -- the loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the relay to stop after the batch in flight."""
        self._stop.set()
        self._notified()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    async def serve(self, *, ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM or SIGINT (then finish the batch in flight and return).

        Args:
            ready: called once the signal handlers are in place.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        if ready is not None:
            ready()
        try:
            await self.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Relay until :meth:`stop`; reconnect after database or broker failures.

        On PostgreSQL ``pipelines`` batch loops run side by side (each claims aggregates the
        others have not locked), so one batch's database round trips overlap another's wait
        for broker acknowledgements.
        """
        listener = asyncio.create_task(self._listen()) if self.store.locking else None
        count = self.settings.pipelines if self.store.locking else 1
        self._wakes = [asyncio.Event() for _ in range(count)]
        try:
            await asyncio.gather(*(self._loop(index) for index in range(count)))
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            await self.publisher.close()

    async def _loop(self, index: int) -> None:
        wake = self._wakes[index]
        failures = 0
        while not self._stop.is_set():
            # Cleared before the claim, never after it: a row committed (and notified) while
            # this batch runs leaves the flag set, so the wait below returns at once.
            wake.clear()
            try:
                await self.publisher.connect()
                result = await self.run_once()
                failures = 0
                if index == 0:
                    await self._maybe_purge()
            except Exception as exc:
                failures += 1
                delay = min(self.settings.reconnect_delay * 2 ** min(failures - 1, 5), 30.0)
                logger.warning("relay batch failed (%s); retrying in %.1fs", _describe(exc), delay)
                await _wait(self._stop, delay)  # back off: only stop() cuts it short
                continue
            if result.claimed >= self.settings.batch_size:
                continue  # a full batch: more is probably waiting
            await _wait(wake, self.settings.poll_interval)

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
            try:
                async with self.engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    driver = raw.driver_connection
                    assert driver is not None
                    lost = asyncio.Event()
                    driver.add_termination_listener(_setter(lost))
                    await driver.add_listener(NOTIFY_CHANNEL, self._notified)
                    self._notified()  # catch up on anything committed while not listening
                    await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info("LISTEN %s lost (%s); polling meanwhile", NOTIFY_CHANNEL, exc)
            await asyncio.sleep(self.settings.reconnect_delay)

    def _notified(self, *_args: Any) -> None:
        for wake in self._wakes:
            wake.set()


@dataclass(slots=True)
class _Outcome:
    summary: BatchResult
    published: list[Mapping[str, Any]] = field(default_factory=list)
    failed: list[tuple[Mapping[str, Any], str]] = field(default_factory=list)


async def _wait(flag: asyncio.Event, seconds: float) -> None:
    """Wait until ``flag`` is set or ``seconds`` pass."""
    if not flag.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(flag.wait(), timeout=seconds)


def _setter(flag: asyncio.Event) -> Any:
    def callback(*_args: Any) -> None:
        flag.set()

    return callback


def _describe(exc: BaseException) -> str:
    if isinstance(exc, QxError):
        return str(exc)
    translated = translate_error(exc) if isinstance(exc, Exception) else None
    if translated is not None:
        return str(translated)
    return f"{type(exc).__name__}: {exc}"
