"""NATS JetStream publisher (``nats://``; needs the ``nats`` extra: nats-py).

Each envelope goes to ``<subject_prefix>.<event name>`` with ``Nats-Msg-Id`` set to the event
id, so JetStream drops a redelivery inside its duplicate window: a relay that crashed after
publishing but before marking the row causes no second message. ``publish`` waits for the
stream's PubAck.
"""

from __future__ import annotations

import contextlib
from typing import Any

from qx.core.errors import ConfigurationError, PublishError
from qx.outbox.envelope import Envelope
from qx.settings import BrokerSettings

__all__ = ["NatsPublisher"]


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
        """Connect (reconnecting forever in the background) and ensure the stream."""
        if self._nc is not None and self._nc.is_connected:
            return
        try:
            import nats
            from nats.js.api import StreamConfig
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "nats:// needs the nats extra: pip install 'qx[nats]'"
            ) from exc
        try:
            self._nc = await nats.connect(
                servers=[self.settings.url],
                connect_timeout=self.settings.publish_timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
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
        headers = {"Nats-Msg-Id": str(envelope.id), **envelope.transport_headers()}
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
