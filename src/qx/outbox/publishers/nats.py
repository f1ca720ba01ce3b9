"""NATS JetStream publisher (``nats://``; needs the ``nats`` extra: nats-py).

Each envelope goes to ``<subject_prefix>.<event name>`` with ``Nats-Msg-Id`` set to the event
id, so JetStream drops a redelivery inside its duplicate window: a relay that crashed after
publishing but before marking the row causes no second message. ``publish`` waits for the
stream's PubAck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from qx.core.errors import ConfigurationError, PublishError
from qx.outbox.envelope import Envelope
from qx.settings import BrokerSettings

__all__ = ["NatsPublisher"]

logger = logging.getLogger("qx.outbox.nats")


async def _quiet(error: Exception) -> None:
    # nats-py logs every failed reconnect at ERROR by default; one debug line is enough,
    # the relay reports the publishes that fail.
    logger.debug("NATS connection error: %r", error)


class NatsPublisher:
    """Publishes to JetStream and waits for each PubAck.

    Args:
        settings: ``url``, ``subject_prefix``, ``stream``, ``create_stream``,
            ``publish_timeout``.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._nc: Any = None
        self._js: Any = None

    def subject(self, envelope: Envelope) -> str:
        """The subject an envelope is published on."""
        return f"{self.settings.subject_prefix}.{envelope.type}"

    async def connect(self) -> None:
        """Connect (reconnecting forever in the background) and ensure the stream.

        A client that lost its server keeps reconnecting by itself; meanwhile publishes time
        out into ``PublishError`` and rows wait for their retry.
        """
        if self._nc is not None and not self._nc.is_closed:
            return
        try:
            import nats
            from nats.js.api import StreamConfig
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "nats:// needs the nats extra: pip install 'qx[nats]'"
            ) from exc
        try:
            # nats-py retries the first connection as long as later ones: bound it here so
            # an unreachable broker at start-up is an error the relay retries, not a hang.
            self._nc = await asyncio.wait_for(
                nats.connect(
                    servers=[self.settings.url],
                    connect_timeout=self.settings.publish_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=_quiet,
                ),
                timeout=self.settings.publish_timeout * 4,
            )
            self._js = self._nc.jetstream(timeout=self.settings.publish_timeout)
            if self.settings.create_stream:
                config = StreamConfig(
                    name=self.settings.stream, subjects=[f"{self.settings.subject_prefix}.>"]
                )
                try:
                    await self._js.add_stream(config)
                except Exception:
                    await self._js.update_stream(config)
        except Exception as exc:
            await self.close()
            raise PublishError(f"cannot connect to NATS at {self.settings.url}: {exc}") from exc

    async def publish(self, envelope: Envelope) -> None:
        """Publish and wait for the PubAck."""
        if self._js is None:
            await self.connect()
        # The body is the whole envelope (CloudEvents structured mode): the only header
        # JetStream needs is the id it deduplicates on.
        headers = {"Nats-Msg-Id": str(envelope.id)}
        try:
            await self._js.publish(
                self.subject(envelope),
                envelope.to_json(),
                timeout=self.settings.publish_timeout,
                headers=headers,
            )
        except Exception as exc:
            raise PublishError(f"NATS did not acknowledge {envelope.id}: {exc!r}") from exc

    async def close(self) -> None:
        """Drain and close the connection."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                await nc.close()
