"""The relay's states and the transitions between them, named and checked.

::

    STARTING ──▶ RELAYING ◀──▶ BROKER_DOWN
        │           ▲  │           ▲
        │           │  ▼           │
        └──────▶ DATABASE_DOWN ◀───┘
    (any of those) ──▶ STOPPING ──▶ STOPPED

A relay is *relaying* while it reaches both the database and the broker; *broker down* while
rows wait untried for the broker (no message is charged for it); *database down* while its
turns fail (it retries with backoff, holding nothing: leases run out on their own);
*stopping* once asked to stop (no new claims; publishes in flight finish or are given back);
*stopped* once its lanes are given back. Any other move is a bug and raises.
"""

from __future__ import annotations

import logging
import time
from enum import Enum
from typing import Final

from qx.core._errors import QxError

__all__ = ["RelayState", "StateMachine"]

logger = logging.getLogger("qx.outbox.relay")


class RelayState(Enum):
    """Where an :class:`~qx.outbox.OutboxRelay` is (``relay.state``).

    Example:
        >>> RelayState.RELAYING.value
        'relaying'
    """

    STARTING = "starting"
    RELAYING = "relaying"
    BROKER_DOWN = "broker_down"
    DATABASE_DOWN = "database_down"
    STOPPING = "stopping"
    STOPPED = "stopped"


_RUNNING = (RelayState.RELAYING, RelayState.BROKER_DOWN, RelayState.DATABASE_DOWN)
#: Every move a relay may make (staying where it is is always allowed).
TRANSITIONS: Final[dict[RelayState, frozenset[RelayState]]] = {
    RelayState.STARTING: frozenset({*_RUNNING, RelayState.STOPPING}),
    RelayState.RELAYING: frozenset({*_RUNNING, RelayState.STOPPING}),
    RelayState.BROKER_DOWN: frozenset({*_RUNNING, RelayState.STOPPING}),
    RelayState.DATABASE_DOWN: frozenset({*_RUNNING, RelayState.STOPPING}),
    RelayState.STOPPING: frozenset({RelayState.STOPPED}),
    RelayState.STOPPED: frozenset(),
}


class StateMachine:
    """The current :class:`RelayState` of one relay, moved only along :data:`TRANSITIONS`.

    Args:
        name: the relay's id, for the log.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = RelayState.STARTING
        self.since = time.monotonic()

    def to(self, state: RelayState, reason: str = "") -> None:
        """Move to ``state`` (nothing when already there).

        Raises:
            QxError: the move is not one a relay makes.
        """
        current = self.state
        if state is current:
            return
        if state not in TRANSITIONS[current]:
            raise QxError(f"relay {self.name}: no transition from {current.value} to {state.value}")
        held = time.monotonic() - self.since
        self.state, self.since = state, time.monotonic()
        logger.info(
            "relay %s: %s -> %s after %.1fs%s",
            self.name,
            current.value,
            state.value,
            held,
            f" ({reason})" if reason else "",
        )

    @property
    def running(self) -> bool:
        """Whether the relay may still claim (not stopping or stopped)."""
        return self.state not in (RelayState.STOPPING, RelayState.STOPPED)
