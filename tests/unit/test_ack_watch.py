"""A missing acknowledgement is the broker's fault unless it acknowledged others since."""

from __future__ import annotations

from qx.errors import BrokerUnavailable, PublishError
from qx.outbox.publishers._health import AckWatch


def test_silence_since_the_send_is_the_broker_s() -> None:
    watch = AckWatch("NATS")
    watch.acknowledged()  # an acknowledgement before the send says nothing of it
    sent = watch.sent()
    error = watch.late(sent, "event 7", 5.0)
    assert isinstance(error, BrokerUnavailable)
    assert "NATS acknowledged nothing within 5s of event 7" in str(error)


def test_others_acknowledged_meanwhile_make_it_the_message_s() -> None:
    watch = AckWatch("RabbitMQ")
    sent = watch.sent()
    watch.acknowledged()
    error = watch.late(sent, "event 8", 1.5)
    assert type(error) is PublishError
    assert "did not acknowledge event 8 within 1.5s while acknowledging" in str(error)
