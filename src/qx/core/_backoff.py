"""``Backoff``: the one rule for how long qx waits before trying again.

Every retry in qx goes through it: the bus retrying a command, the relay retrying a
message that failed, the relay and the subscribers waiting for a database or a broker to
come back. The wait doubles from ``base`` up to ``maximum``; with ``jitter`` it is drawn from
the upper half of that ceiling, so peers that failed together do not retry together, while
no wait is ever shorter than half the ceiling (a retry is never immediate).

Example:
    >>> policy = Backoff(base=1.0, maximum=30.0, jitter=False)
    >>> [policy.delay(n) for n in (1, 2, 3, 10)]
    [1.0, 2.0, 4.0, 30.0]
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]

# 2**64 seconds is more than any maximum: past it the exponent only costs time.
_MAX_EXPONENT = 64


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff, capped, optionally jittered.

    Attributes:
        base: seconds before the first retry (``attempt`` 1).
        maximum: the longest wait.
        jitter: draw each wait from ``[ceiling / 2, ceiling]`` instead of the ceiling.
    """

    base: float
    maximum: float
    jitter: bool = True

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (1 for the first retry)."""
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        return float(min(self.maximum, self.base * 2**exponent))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
        ceiling = self.ceiling(attempt)
        return float(random.uniform(ceiling / 2, ceiling)) if self.jitter else ceiling
