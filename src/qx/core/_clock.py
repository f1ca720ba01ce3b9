"""Clocks: the port qx reads time through, so tests can freeze it.

Example:
    >>> from datetime import UTC, datetime
    >>> from qx.core._clock import FixedClock
    >>> FixedClock(datetime(2030, 1, 1, tzinfo=UTC)).now().year
    2030
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from qx.core._errors import ConfigurationError

__all__ = ["Clock", "FixedClock", "SystemClock", "utcnow"]


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


@runtime_checkable
class Clock(Protocol):
    """Port: something that tells the current, timezone-aware time."""

    def now(self) -> datetime:
        """Return the current time, timezone-aware."""
        ...


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> datetime:
        """Return ``datetime.now(UTC)``."""
        return datetime.now(UTC)


class FixedClock:
    """A clock that stands still until moved; for tests.

    Args:
        at: the time to report; must be timezone-aware.
    """

    def __init__(self, at: datetime) -> None:
        if at.tzinfo is None:
            raise ConfigurationError(f"FixedClock needs a timezone-aware datetime, got {at!r}")
        self._at = at

    def now(self) -> datetime:
        """Return the fixed time."""
        return self._at

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta``."""
        self._at += delta
