"""Outbox pieces without services: envelopes, backoff, publisher selection, metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import pytest

from qx.errors import ConfigurationError, InvalidMessage, PublishError
from qx.outbox import (
    BatchResult,
    Envelope,
    LogPublisher,
    MemoryPublisher,
    backoff_delay,
    publisher_from_settings,
)
from qx.outbox.publishers import NatsPublisher, RabbitPublisher, RedisPublisher
from qx.settings import BrokerSettings


def envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "id": UUID(int=7),
        "type": "orders.order_placed",
        "version": 2,
        "time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "source": "shop",
        "data": {"total": "9.90"},
        "aggregate_type": "Order",
        "aggregate_id": "42",
        "correlation_id": "c-1",
        "tenant_id": "acme",
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "headers": {"user_id": "u-1"},
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_envelope_uses_cloudevents_names_and_round_trips() -> None:
    env = envelope()
    attrs = env.attributes()
    assert attrs["specversion"] == "1.0" and attrs["type"] == "orders.order_placed"
    assert attrs["time"] == "2026-01-02T03:04:05+00:00" and attrs["subject"] == "Order/42"
    assert attrs["eventversion"] == 2 and attrs["tenantid"] == "acme"
    assert attrs["traceparent"].startswith("00-") and attrs["headers"] == {"user_id": "u-1"}
    assert "causationid" not in attrs  # None attributes are left out
    assert Envelope.from_json(env.to_json()) == env
    assert env.transport_headers()["ce-id"] == str(UUID(int=7))
    for bad in (b"not json", b"{}", b'{"id": "x"}'):
        with pytest.raises(InvalidMessage):
            Envelope.from_json(bad)


def test_envelope_from_row_moves_traceparent_out_of_headers() -> None:
    row = {
        "id": UUID(int=1), "event_name": "a.b", "event_version": 1,
        "occurred_at": datetime(2026, 1, 1, tzinfo=UTC), "payload": {"x": 1},
        "headers": {"traceparent": "tp", "user_id": "u"}, "aggregate_type": None,
        "aggregate_id": None, "correlation_id": None, "causation_id": "e-0", "tenant_id": None,
    }  # fmt: skip
    env = Envelope.from_row(row, source="svc")
    assert (env.traceparent, dict(env.headers), env.subject) == ("tp", {"user_id": "u"}, None)


def test_backoff_grows_caps_and_jitters() -> None:
    for attempts, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0)):
        delays = {backoff_delay(attempts, base=1.0, maximum=60.0) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1


def test_publisher_selection_by_url() -> None:
    def make(url: str) -> object:
        return publisher_from_settings(BrokerSettings(url=url))

    assert isinstance(make("memory://"), MemoryPublisher)
    assert isinstance(make("log://"), LogPublisher)
    assert isinstance(make("nats://h:4222"), NatsPublisher)
    assert isinstance(make("amqp://guest:guest@h/"), RabbitPublisher)
    assert isinstance(make("redis://h:6379/0"), RedisPublisher)
    with pytest.raises(ConfigurationError) as info:
        make("kafka://h:9092")
    assert "QX_BROKER__URL" in str(info.value)


async def test_memory_publisher_can_fail() -> None:
    publisher = MemoryPublisher()
    await publisher.publish(envelope())
    publisher.fail_with = "down"
    with pytest.raises(PublishError):
        await publisher.publish(envelope())
    assert len(publisher.published) == 1


def test_prometheus_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from qx.outbox import PrometheusMetrics

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    metrics.batch(BatchResult(claimed=3, published=2, failed=1, dead=1, lag_seconds=0.5), 0.01)
    assert registry.get_sample_value("qx_outbox_published_total") == 2
    assert registry.get_sample_value("qx_outbox_dead_total") == 1
    assert registry.get_sample_value("qx_outbox_lag_seconds") == 0.5
    assert registry.get_sample_value("qx_outbox_batch_seconds_count") == 1
