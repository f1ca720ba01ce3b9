"""Where events go and where subscribers read them, with and without partitions: one rule
(``qx.outbox._destinations``) for the publishers and the subscribers of every broker."""

from __future__ import annotations

from collections import Counter
from uuid import UUID

import pytest

from qx.core import new_id, utcnow
from qx.outbox import Envelope
from qx.outbox._destinations import (
    nats_filter,
    nats_subject,
    partition_of,
    rabbit_bindings,
    rabbit_routing_key,
    redis_stream,
    redis_stream_of,
)
from qx.outbox._table import OUTBOX_LANES, lane_of
from qx.outbox.publishers import NatsPublisher, RabbitPublisher, RedisPublisher
from qx.settings import BrokerSettings

PLAIN = BrokerSettings(subject_prefix="shop", redis_stream="shop:events")
SPLIT = BrokerSettings(subject_prefix="shop", redis_stream="shop:events", partitions=8)


def event(aggregate_id: str | None, *, name: str = "orders.order_placed") -> Envelope:
    return Envelope(
        id=new_id(),
        type=name,
        version=1,
        time=utcnow(),
        source="t",
        data={},
        aggregate_type="Order" if aggregate_id else None,
        aggregate_id=aggregate_id,
    )


def test_without_partitions_destinations_name_the_event_only() -> None:
    placed = event("42")
    assert partition_of(PLAIN, placed) is None
    assert nats_subject(PLAIN, placed) == "shop.orders.order_placed"
    assert rabbit_routing_key(PLAIN, placed) == "orders.order_placed"
    assert redis_stream(PLAIN, placed) == "shop:events"
    assert nats_filter(PLAIN, None) == "shop.>"
    assert rabbit_bindings(PLAIN, ["orders.order_placed"], None) == ["orders.order_placed"]
    assert rabbit_bindings(PLAIN, [], None) == ["#"]


def test_with_partitions_an_aggregates_events_share_one_partition() -> None:
    first, later = event("42"), event("42", name="orders.order_paid")
    k = partition_of(SPLIT, first)
    assert k is not None and k == partition_of(SPLIT, later)
    assert nats_subject(SPLIT, first) == f"shop.p{k}.orders.order_placed"
    assert nats_subject(SPLIT, later).startswith(nats_filter(SPLIT, k)[:-1])
    assert rabbit_routing_key(SPLIT, later) == f"p{k}.orders.order_paid"
    assert redis_stream(SPLIT, first) == redis_stream_of(SPLIT, k) == f"shop:events.p{k}"
    # A partition's queue binds that partition's keys; a queue of the whole group any.
    assert rabbit_bindings(SPLIT, ["orders.order_paid"], k) == [f"p{k}.orders.order_paid"]
    assert rabbit_bindings(SPLIT, ["orders.order_paid"], None) == ["*.orders.order_paid"]
    assert rabbit_bindings(SPLIT, [], k) == [f"p{k}.#"]


def test_partitions_follow_the_lane_hash_and_spread() -> None:
    # The relay's lanes and the brokers' partitions are one hash of the aggregate.
    for n in range(200):
        placed = event(str(n))
        lane = lane_of(placed.aggregate_type, placed.aggregate_id, placed.id)
        assert partition_of(BrokerSettings(partitions=OUTBOX_LANES), placed) == lane
    spread = Counter(partition_of(SPLIT, event(str(n))) for n in range(800))
    assert set(spread) == set(range(8)) and min(spread.values()) > 50
    # Without an aggregate, the event id decides.
    loose = event(None)
    assert partition_of(SPLIT, loose) == lane_of(None, None, UUID(str(loose.id))) % 8


@pytest.mark.parametrize(
    ("publisher", "expected"),
    [
        (NatsPublisher, "shop.p{k}.orders.order_placed"),
        (RabbitPublisher, "{exchange}"),
        (RedisPublisher, "shop:events.p{k}"),
    ],
)
def test_publishers_send_where_the_rule_says(publisher: type, expected: str) -> None:
    placed = event("7")
    k = partition_of(SPLIT, placed)
    assert publisher(SPLIT).destination(placed) == expected.format(k=k, exchange=SPLIT.exchange)


def test_partitions_are_bounded() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="partitions"):
        BrokerSettings(partitions=-1)
    with pytest.raises(ValidationError, match="partitions"):
        BrokerSettings(partitions=5000)


def test_a_redis_subscriber_of_partitioned_streams_names_its_partition() -> None:
    from typing import Any

    from qx.errors import ConfigurationError
    from qx.outbox import EventRouter, RedisSubscriber

    inbox: Any = object()  # not reached: the settings are refused first
    with pytest.raises(ConfigurationError, match="QX_BROKER__PARTITIONS is 8"):
        RedisSubscriber(SPLIT, inbox, EventRouter(), group="g", consumer="c")
    one = RedisSubscriber(SPLIT, inbox, EventRouter(), group="g", consumer="c", partition=3)
    assert one.stream == "shop:events.p3"
