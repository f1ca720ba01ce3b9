"""Redis Streams publisher (``redis://``; needs the ``redis`` extra).

Each envelope is one ``XADD`` to ``redis_stream`` (``<redis_stream>.p<k>`` with
``QX_BROKER__PARTITIONS``: :mod:`qx.outbox._destinations`; optionally capped with an approximate
``MAXLEN``) with the fields ``id``, ``type`` and ``envelope`` (the JSON). Redis has no
deduplication: consumers use the inbox (``id``) to drop redeliveries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qx.core._errors import BrokerUnavailable, ConfigurationError, PublishError
from qx.outbox._destinations import redis_stream
from qx.outbox._envelope import Envelope
from qx.outbox.publishers._connecting import Connecting
from qx.settings import BrokerSettings

__all__ = ["RedisPublisher"]


class RedisPublisher(Connecting):
    """Appends envelopes to a Redis stream.

    Args:
        settings: ``url``, ``redis_stream``, ``redis_maxlen``, ``publish_timeout``.
    """

    messaging_system = "redis"

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__()
        self.settings = settings
        self._client: Any = None

    def destination(self, envelope: Envelope) -> str:
        """The stream (its partition's, with ``partitions``)."""
        return redis_stream(self.settings, envelope)

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def _ping(self) -> None:
        await self._client.ping()

    async def _open(self) -> None:
        """Create the client and check the server answers."""
        try:
            import redis.asyncio as redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "redis:// needs the redis extra: pip install 'qx[redis]'"
            ) from exc
        client = redis.from_url(
            self.settings.url,
            socket_timeout=self.settings.publish_timeout,
            socket_connect_timeout=self.settings.publish_timeout,
            # A connection idle longer than this is checked before use, and keepalives
            # find a peer that vanished.
            health_check_interval=self.settings.heartbeat,
            socket_keepalive=True,
        )
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            raise BrokerUnavailable(f"cannot connect to Redis: {exc!r}") from exc
        self._client = client

    async def publish(self, envelope: Envelope) -> None:
        """XADD the envelope; the reply is the acknowledgement."""
        if self._client is None:
            await self.connect()
        fields = {"id": str(envelope.id), "type": envelope.type, "envelope": envelope.to_json()}
        try:
            await self._client.xadd(
                redis_stream(self.settings, envelope),
                fields,
                maxlen=self.settings.redis_maxlen,
                approximate=True,
            )
        except Exception as exc:
            raise _classify(exc, f"Redis did not take {envelope.id}: {exc!r}") from exc

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """All XADDs in one pipeline (one round trip); each reply acknowledges its entry."""
        if self._client is None:
            await self.connect()
        pipe = self._client.pipeline(transaction=False)
        for envelope in envelopes:
            pipe.xadd(
                redis_stream(self.settings, envelope),
                {"id": str(envelope.id), "type": envelope.type, "envelope": envelope.to_json()},
                maxlen=self.settings.redis_maxlen,
                approximate=True,
            )
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            error = _classify(exc, f"Redis did not take the batch: {exc!r}")
            return [error for _ in envelopes]
        return [
            PublishError(f"Redis did not take {envelope.id}: {reply!r}")
            if isinstance(reply, Exception)
            else None
            for envelope, reply in zip(envelopes, replies, strict=True)
        ]

    async def close(self) -> None:
        """Close the client."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _classify(exc: Exception, message: str) -> PublishError:
    """A lost connection is the broker's unavailability; anything else, this message's fault."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        return BrokerUnavailable(message)
    return PublishError(message)
