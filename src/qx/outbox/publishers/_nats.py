"""NATS JetStream publisher (``nats://``; needs the ``nats`` extra: nats-py).

Each envelope goes to ``<subject_prefix>.<event name>`` (with ``QX_BROKER__PARTITIONS``,
``<subject_prefix>.p<k>.<event name>``: :mod:`qx.outbox._destinations`) with ``Nats-Msg-Id``
set to the event id, so JetStream drops a redelivery inside its duplicate window: a relay
that crashed after publishing but before marking the row causes no second message. The
window is JetStream's stream setting (2 minutes by default); qx sets it to
``QX_BROKER__DUPLICATE_WINDOW`` when it creates the stream, and it must outlast the relay's
lease period. ``publish`` waits for the stream's PubAck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from qx.core._errors import BrokerUnavailable, ConfigurationError, PublishError
from qx.outbox._destinations import nats_subject
from qx.outbox._envelope import Envelope
from qx.outbox.publishers._connecting import Connecting
from qx.outbox.publishers._health import AckWatch
from qx.settings import BrokerSettings

__all__ = ["NatsPublisher", "connect_nats"]

logger = logging.getLogger("qx.outbox.nats")


async def _quiet(error: Exception) -> None:
    # nats-py logs every failed reconnect at ERROR by default; one debug line is enough,
    # the relay (or the subscriber's loop) reports what fails.
    logger.debug("NATS connection error: %r", error)


async def connect_nats(settings: BrokerSettings, *, reconnect: bool) -> Any:
    """A nats-py client connected to ``settings.url``; how publishers and subscribers
    connect.

    Args:
        settings: the broker's URL, timeouts and heartbeat.
        reconnect: the client re-establishes a lost connection by itself (a publisher);
            without, the caller's loop reconnects (a subscriber, which must subscribe
            again).

    Raises:
        ConfigurationError: the ``nats`` extra is not installed.
        Exception: nats-py's, or ``TimeoutError``, when no connection was made.
    """
    try:
        from nats.aio.client import Client
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigurationError("nats:// needs the nats extra: pip install 'qx[nats]'") from exc
    client: Any = Client()
    try:
        # nats-py bounds only the TCP connect by connect_timeout, not the handshake after
        # it, and with reconnect it retries the first connection as long as later ones:
        # bound it here so an unreachable or silent broker is an error the caller retries,
        # not a hang (a single attempt gets one publish_timeout, retries a few).
        await asyncio.wait_for(
            client.connect(
                servers=[settings.url],
                connect_timeout=settings.publish_timeout,
                allow_reconnect=reconnect,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                # A silent connection (a partition) is found by its missing PONGs, instead
                # of after the OS gives up on it.
                ping_interval=settings.heartbeat,
                max_outstanding_pings=2,
                error_cb=_quiet,
            ),
            timeout=settings.publish_timeout * (4 if reconnect else 1),
        )
    except BaseException:
        # A failed connect leaves its half-open socket behind (a ResourceWarning, and a
        # descriptor per attempt while a broker is partitioned away): close it.
        with contextlib.suppress(Exception):
            await client.close()
        raise
    return client


class NatsPublisher(Connecting):
    """Publishes to JetStream and waits for each PubAck.

    Args:
        settings: ``url``, ``subject_prefix``, ``stream``, ``create_stream``,
            ``publish_timeout``.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__()
        self.settings = settings
        self._nc: Any = None
        self._js: Any = None
        self._acks: Any = None
        self._reply_prefix = ""
        self._token = 0
        # token -> (future, event id, sent at); deadlines in sending order (one timeout
        # for all).
        self._pending: dict[str, tuple[asyncio.Future[None], Any, float]] = {}
        self._watch = AckWatch("NATS")
        self._deadlines: deque[tuple[float, str]] = deque()
        self._sweeper: asyncio.Task[None] | None = None

    messaging_system = "nats"

    def subject(self, envelope: Envelope) -> str:
        """The subject an envelope is published on."""
        return nats_subject(self.settings, envelope)

    destination = subject

    @property
    def connected(self) -> bool:
        return self._nc is not None and not self._nc.is_closed

    async def _ping(self) -> None:
        # A client reconnecting by itself is still open: only a live link carries a PING.
        if not self._nc.is_connected:
            raise BrokerUnavailable(f"NATS at {self.settings.url} is not connected")
        await self._nc.flush(timeout=self.settings.publish_timeout)

    async def _open(self) -> None:
        """Connect (reconnecting forever in the background) and ensure the stream.

        A client that lost its server keeps reconnecting by itself; meanwhile publishes time
        out into ``PublishError`` and rows wait for their retry.
        """
        try:
            from nats.js.api import StreamConfig
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "nats:// needs the nats extra: pip install 'qx[nats]'"
            ) from exc
        try:
            self._nc = await connect_nats(self.settings, reconnect=True)
            self._js = self._nc.jetstream(timeout=self.settings.publish_timeout)
            if self.settings.create_stream:
                # The duplicate window is how long JetStream remembers a Nats-Msg-Id: a row
                # published again after a relay died (a lease period later) must fall in it.
                config = StreamConfig(
                    name=self.settings.stream,
                    subjects=[f"{self.settings.subject_prefix}.>"],
                    duplicate_window=self.settings.duplicate_window,
                )
                try:
                    await self._js.add_stream(config)
                except Exception:
                    await self._js.update_stream(config)
        except Exception as exc:
            await self.close()
            raise PublishError(f"cannot connect to NATS at {self.settings.url}: {exc}") from exc

    async def publish(self, envelope: Envelope) -> None:
        """Publish and wait for the PubAck.

        Raises:
            BrokerUnavailable: not connected to NATS (the client is reconnecting).
            PublishError: JetStream refused the message or did not acknowledge it in time.
        """
        sent = await self._send(envelope)
        if isinstance(sent, BaseException):
            raise sent
        await sent  # the sweeper fails it once publish_timeout has passed

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """Send every envelope, then wait for all their PubAcks together.

        The order in which messages reach the stream is the order they are sent.
        """
        sent_at = self._watch.sent()
        sent = [await self._send(envelope) for envelope in envelopes]
        futures = [item for item in sent if isinstance(item, asyncio.Future)]
        if futures:
            await asyncio.wait(futures, timeout=self.settings.publish_timeout)
        results: list[BaseException | None] = []
        for envelope, item in zip(envelopes, sent, strict=True):
            if isinstance(item, BaseException):
                results.append(item)
            elif not item.done():
                item.cancel()
                results.append(self._late(envelope.id, sent_at))
            elif item.exception() is not None:
                results.append(item.exception())
            else:
                results.append(None)
        return results

    def _late(self, event_id: Any, sent_at: float) -> PublishError:
        """No PubAck in time: the broker's fault if the connection is down or has been
        silent since the message went out."""
        if self._nc is None or not self._nc.is_connected:
            return BrokerUnavailable(f"NATS connection lost before {event_id} was acknowledged")
        return self._watch.late(sent_at, str(event_id), self.settings.publish_timeout)

    async def _sweep(self) -> None:
        """Fail every message whose PubAck is later than ``publish_timeout``: one timer for
        all of them, not one per message."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._deadlines:
                await asyncio.sleep(self.settings.publish_timeout / 4)
                continue
            deadline, token = self._deadlines[0]
            wait = deadline - loop.time()
            if wait > 0:
                await asyncio.sleep(min(wait, self.settings.publish_timeout / 4))
                continue
            self._deadlines.popleft()
            entry = self._pending.pop(token, None)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(self._late(entry[1], entry[2]))

    async def _send(self, envelope: Envelope) -> asyncio.Future[None] | BaseException:
        """Send one message with a reply subject of this publisher's; the future resolves
        on its PubAck.

        JetStream answers each message on its reply subject; one subscription on the reply
        prefix resolves every future. Compared with one request per message this halves
        the client's work per event.
        """
        if self._js is None:
            await self.connect()
        if not self._nc.is_connected:
            return BrokerUnavailable(f"NATS at {self.settings.url} is not connected")
        if self._acks is None:
            self._reply_prefix = self._nc.new_inbox() + "."
            self._acks = await self._nc.subscribe(self._reply_prefix + "*", cb=self._on_ack)
        self._token += 1
        token = str(self._token)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending[token] = (future, envelope.id, self._watch.sent())
        self._deadlines.append((loop.time() + self.settings.publish_timeout, token))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())
        try:
            # The body is the whole envelope (CloudEvents structured mode): the only header
            # JetStream needs is the id it deduplicates on.
            await self._nc.publish(
                self.subject(envelope),
                envelope.to_json(),
                reply=self._reply_prefix + token,
                headers={"Nats-Msg-Id": str(envelope.id)},
            )
        except Exception as exc:
            self._pending.pop(token, None)
            future.cancel()
            return BrokerUnavailable(f"NATS did not take {envelope.id}: {exc!r}")
        return future

    async def _on_ack(self, message: Any) -> None:
        entry = self._pending.pop(message.subject[len(self._reply_prefix) :], None)
        if entry is None or entry[0].done():
            return
        self._watch.acknowledged()
        future = entry[0]
        data: bytes = message.data or b""
        if b'"error"' in data or b'"stream"' not in data:
            # An API error, or a 503 "no responders" status: no stream holds the subject.
            status = (message.headers or {}).get("Status", "")
            detail = data.decode(errors="replace") or f"status {status or 'unknown'}"
            future.set_exception(PublishError(f"NATS refused the message: {detail}"))
        else:
            future.set_result(None)

    async def close(self) -> None:
        """Drain and close the connection."""
        nc, self._nc, self._js, self._acks = self._nc, None, None, None
        for future, _, _ in self._pending.values():
            future.cancel()
        self._pending = {}
        self._deadlines.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if nc is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                await nc.close()
