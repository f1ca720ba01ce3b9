"""Outbox pieces without services: envelopes, backoff, publisher selection, metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest

from qx.core._backoff import Backoff
from qx.cqrs import RetryPolicy
from qx.errors import ConfigurationError, InvalidMessage, PublishError
from qx.outbox import BatchResult, Envelope, outbox_table
from qx.outbox._claimed import ClaimedRow, claimed_columns
from qx.outbox._store import reconnect_backoff, retry_backoff
from qx.outbox.publishers import (
    KafkaPublisher,
    LogPublisher,
    NatsPublisher,
    RabbitPublisher,
    RedisPublisher,
    publisher_from_settings,
)
from qx.settings import BrokerSettings, RelaySettings
from qx.testing import MemoryPublisher


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


def claimed(**changes: Any) -> ClaimedRow:
    row = ClaimedRow(
        position=7, id=UUID(int=1), event_name="a.b", event_version=1,
        aggregate_type=None, aggregate_id=None, payload='{"x": 1}',
        headers='{"traceparent": "tp", "user_id": "u"}',
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC), correlation_id=None,
        causation_id="e-0", tenant_id=None, attempts=0, lane=3, aggregate_seq=None,
        next_attempt_at=None, dead_at=None,
    )  # fmt: skip
    return row._replace(**changes)


def test_a_claimed_row_is_read_by_attribute_and_becomes_its_envelope() -> None:
    row = claimed()
    env = row.envelope(source="svc")
    assert (env.traceparent, dict(env.headers), env.subject) == ("tp", {"user_id": "u"}, None)
    assert (env.position, env.sequence, dict(env.data)) == (7, None, {"x": 1})
    assert row.key is None
    numbered = claimed(aggregate_type="Order", aggregate_id="9").numbered(4)
    assert (numbered.key, numbered.envelope(source="svc").sequence) == (("Order", "9"), 4)
    with pytest.raises(AttributeError):
        row.attempts = 2  # type: ignore[misc]
    # A claim's select list is the record's fields in order: rows become records by position.
    names = [c.name for c in claimed_columns(outbox_table)]
    assert names == list(ClaimedRow._fields)[:-1]
    assert claimed(headers="{}").envelope(source="s").headers == {}


@pytest.mark.parametrize("jitter", [True, False])
def test_backoff_grows_caps_and_jitters_in_the_upper_half(jitter: bool) -> None:
    policy = Backoff(1.0, 60.0, jitter=jitter)
    for attempts, ceiling in ((0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0), (10**6, 60.0)):
        delays = {policy.delay(attempts) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert (len(delays) > 1) is jitter or ceiling == 0


def test_every_retry_of_qx_waits_by_the_one_backoff_rule() -> None:
    settings = RelaySettings(backoff_base=2.0, backoff_max=10.0, reconnect_delay=0.5)
    assert retry_backoff(settings) == Backoff(2.0, 10.0)
    assert reconnect_backoff(settings) == Backoff(0.5, 30.0, jitter=False)
    assert [reconnect_backoff(settings).delay(n) for n in (1, 2, 7)] == [0.5, 1.0, 30.0]
    policy = RetryPolicy(base_delay=0.01, max_delay=0.04)
    assert all(0.02 <= policy.delay(3) <= 0.04 for _ in range(20))


def test_publisher_selection_by_url() -> None:
    def make(url: str) -> object:
        return publisher_from_settings(BrokerSettings(url=url))

    assert isinstance(make("memory://"), MemoryPublisher)
    assert isinstance(make("log://"), LogPublisher)
    assert isinstance(make("nats://h:4222"), NatsPublisher)
    assert isinstance(make("amqp://guest:guest@h/"), RabbitPublisher)
    assert isinstance(make("redis://h:6379/0"), RedisPublisher)
    assert isinstance(make("kafka://h:9092,h2:9092"), KafkaPublisher)
    with pytest.raises(ConfigurationError) as info:
        make("pulsar://h:6650")
    assert "QX_BROKER__URL" in str(info.value) and "kafka://" in str(info.value)


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
