"""``AckWatch``: whether a broker that did not acknowledge a message in time is down, or
refused that message.

A missing acknowledgement says nothing by itself: the broker may be gone without a word (a
silent partition, a dead peer behind a firewall), or it may be up and not taking this one
message. Only the second is the message's fault, and only it may count an attempt (and,
after ``max_attempts``, dead-letter the row and park its aggregate). So every publisher
notes each acknowledgement it receives, and a message that timed out is charged to the
broker unless the broker acknowledged something sent after it meanwhile.

Example:
    >>> watch = AckWatch("NATS")
    >>> sent = watch.sent()
    >>> isinstance(watch.late(sent, "event 42", 5.0), BrokerUnavailable)
    True
"""

from __future__ import annotations

import time

from qx.core._errors import BrokerUnavailable, PublishError

__all__ = ["AckWatch"]


class AckWatch:
    """Notes when a broker last acknowledged anything.

    Args:
        broker: the broker's name in error messages.
    """

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self._last_ack = float("-inf")

    @staticmethod
    def sent() -> float:
        """The moment a message is sent (pass it to :meth:`late`)."""
        return time.monotonic()

    def acknowledged(self) -> None:
        """The broker answered a message (confirmed or refused it: either way it is up)."""
        self._last_ack = time.monotonic()

    def late(self, sent_at: float, what: str, timeout: float) -> PublishError:
        """The error for ``what``, sent at ``sent_at`` and not acknowledged in ``timeout``
        seconds: the message's own fault only if the broker answered others since."""
        if self._last_ack > sent_at:
            return PublishError(
                f"{self.broker} did not acknowledge {what} within {timeout:g}s "
                "while acknowledging other messages"
            )
        return BrokerUnavailable(
            f"{self.broker} acknowledged nothing within {timeout:g}s of {what} "
            "(the connection is silent)"
        )
