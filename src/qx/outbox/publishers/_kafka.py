"""Kafka publisher (``kafka://host:port[,host:port…]``; needs the ``kafka`` extra: aiokafka).

Each envelope is one record: the aggregate (``<type>/<id>``, or the event id for an event of
no aggregate) as the key, so an aggregate's events land on one partition in order; the JSON
envelope as the value; its CloudEvents attributes as headers (``ce-id``, ``ce-type``, …). The
topic is ``kafka_topic``, or ``<subject_prefix>.<event name>`` per event type when that is
empty; topics missing on the broker are created (``kafka_partitions`` partitions).

``acks="all"``: ``publish`` returns once every in-sync replica holds the record. Order across
retries: the producer's own retries are off (the relay retries), and aiokafka keeps one
request in flight per partition, so a failed batch is never overtaken by a later one of the
same partition. The idempotent producer is not used: brokers without it (Tansu) refuse its
``InitProducerId``; Kafka has no deduplication otherwise, so consumers use the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from qx.core._errors import BrokerUnavailable, ConfigurationError, PublishError
from qx.outbox._envelope import Envelope
from qx.outbox.publishers._connecting import Connecting
from qx.settings import BrokerSettings

__all__ = ["KafkaPublisher", "kafka_servers", "kafka_topic", "record_key"]


def kafka_servers(settings: BrokerSettings) -> str:
    """The bootstrap servers of ``kafka://host:port[,host:port…]``."""
    netloc = urlsplit(settings.url).netloc
    if not netloc:
        raise ConfigurationError(f"QX_BROKER__URL: no host in {settings.url[:200]!r}")
    return netloc


def kafka_topic(settings: BrokerSettings, event_type: str) -> str:
    """The topic an event of ``event_type`` goes to."""
    return settings.kafka_topic or f"{settings.subject_prefix}.{event_type}"


def record_key(envelope: Envelope) -> bytes:
    """The record key: the aggregate, so its events share a partition."""
    return (envelope.subject or str(envelope.id)).encode()


class KafkaPublisher(Connecting):
    """Produces envelopes to Kafka and waits for ``acks=all``.

    Args:
        settings: ``url``, ``kafka_topic``, ``kafka_partitions``, ``subject_prefix``,
            ``publish_timeout``.
    """

    messaging_system = "kafka"

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__()
        self.settings = settings
        self._producer: Any = None
        self._topics: set[str] = set()

    def destination(self, envelope: Envelope) -> str:
        """The topic."""
        return kafka_topic(self.settings, envelope.type)

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def _ping(self) -> None:
        # A metadata request to any broker the client knows (it raises if none answered).
        await self._producer.client.fetch_all_metadata()

    async def _open(self) -> None:
        try:
            from aiokafka import AIOKafkaProducer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "kafka:// needs the kafka extra: pip install 'qx[kafka]'"
            ) from exc
        timeout_ms = int(self.settings.publish_timeout * 1000)
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_servers(self.settings),
            acks="all",
            enable_idempotence=False,
            request_timeout_ms=timeout_ms,
            retry_backoff_ms=100,
            metadata_max_age_ms=30_000,
            connections_max_idle_ms=max(int(self.settings.heartbeat * 1000) * 30, 10_000),
        )
        try:
            await asyncio.wait_for(producer.start(), self.settings.publish_timeout)
        except Exception as exc:
            await _quietly(producer.stop())
            raise BrokerUnavailable(f"cannot connect to Kafka: {exc!r}") from exc
        self._producer = producer

    async def _ensure_topic(self, topic: str) -> None:
        if topic in self._topics:
            return
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        admin = AIOKafkaAdminClient(
            bootstrap_servers=kafka_servers(self.settings),
            request_timeout_ms=int(self.settings.publish_timeout * 1000),
        )
        try:
            await asyncio.wait_for(admin.start(), self.settings.publish_timeout)
            existing = await admin.list_topics()
            if topic not in existing:
                # Another relay may create it meanwhile.
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(topic, self.settings.kafka_partitions, 1)])
        except (TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach Kafka to create {topic}: {exc!r}") from exc
        finally:
            await _quietly(admin.close())
        self._topics.add(topic)

    async def publish(self, envelope: Envelope) -> None:
        """Produce one record and wait for ``acks=all``."""
        outcome = (await self.publish_many([envelope]))[0]
        if outcome is not None:
            raise outcome

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """Send every record, then wait for all acknowledgements together."""
        if self._producer is None:
            await self.connect()
        for topic in {self.destination(envelope) for envelope in envelopes}:
            try:
                await self._ensure_topic(topic)
            except BrokerUnavailable as exc:
                return [exc for _ in envelopes]
        sent: list[Any] = []
        for envelope in envelopes:
            try:
                future = await self._producer.send(
                    self.destination(envelope),
                    value=envelope.to_json(),
                    key=record_key(envelope),
                    headers=[(k, v.encode()) for k, v in envelope.transport_headers().items()],
                )
            except Exception as exc:
                sent.append(exc)
            else:
                sent.append(future)
        outcomes: list[BaseException | None] = []
        for envelope, future in zip(envelopes, sent, strict=True):
            if isinstance(future, BaseException):
                outcomes.append(_classify(future, envelope))
                continue
            try:
                await asyncio.wait_for(future, self.settings.publish_timeout)
            except Exception as exc:
                outcomes.append(_classify(exc, envelope))
            else:
                outcomes.append(None)
        return outcomes

    async def close(self) -> None:
        """Flush nothing further and close the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await _quietly(producer.stop())


def _classify(exc: BaseException, envelope: Envelope) -> PublishError:
    """A broker that cannot be reached or does not answer is unavailable (the row waits
    untried); a refusal is this message's fault."""
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, RequestTimedOutError

    message = f"Kafka did not take {envelope.id}: {exc!r}"
    unreachable = (
        TimeoutError,
        OSError,
        KafkaConnectionError,
        KafkaTimeoutError,
        RequestTimedOutError,
    )
    if isinstance(exc, unreachable) or "NodeNotReady" in type(exc).__name__:
        return BrokerUnavailable(message)
    return PublishError(message)


async def _quietly(step: Any) -> None:
    try:
        await asyncio.wait_for(step, 5)
    except Exception:  # closing what is already broken
        return
