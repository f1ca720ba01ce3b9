"""Time-ordered identifiers: UUIDv7 (RFC 9562), monotonic within a process.

Layout: 48 bits of Unix milliseconds, version 7, a 12-bit counter (``rand_a`` used as the
"fixed-length dedicated counter" of RFC 9562 §6.2 method 1), variant bits, 62 random bits.
Within one millisecond the counter increases, so ids sort in creation order; if the clock
steps backwards the last timestamp is reused, so ordering still holds.

Example:
    >>> from qx.core._ids import new_id
    >>> a, b = new_id(), new_id()
    >>> a.version, a < b
    (7, True)
"""

from __future__ import annotations

import os
import threading
import time
from uuid import UUID, SafeUUID

__all__ = ["new_id", "uuid7_timestamp_ms"]

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_COUNTER_MAX = 0xFFF

# Random bytes are read from the OS a page at a time and handed out under the lock: one
# getrandom() system call per id cost a few percent of placing an order. A forked child
# starts a page of its own, or it would repeat its parent's next ids' random bits.
_PAGE = 4096
_page = b""
_at = 0


def _random(n: int) -> int:
    global _page, _at
    if _at + n > len(_page):
        _page, _at = os.urandom(_PAGE), 0
    start = _at
    _at += n
    return int.from_bytes(_page[start : start + n], "big")


def _forget_page() -> None:
    global _page, _at
    _page, _at = b"", 0


os.register_at_fork(after_in_child=_forget_page)

# ``UUID(int=...)`` checks its arguments in Python (a tenth of an id's cost): the value
# built here is a valid 128-bit UUIDv7 by construction, so the instance is made as
# ``UUID.__init__`` would leave it (its two slots), without the checks.
_new_uuid = object.__new__
_set_slot = object.__setattr__
_UNKNOWN = SafeUUID.unknown


def new_id() -> UUID:
    """Return a new UUIDv7, greater than every id this process returned before."""
    global _last_ms, _counter
    now_ms = time.time_ns() // 1_000_000
    with _lock:
        if now_ms > _last_ms:
            _last_ms = now_ms
            # Start each millisecond at a random point in the lower half of the counter space,
            # so ids are less guessable yet leave room for 2048+ ids in the same millisecond.
            _counter = _random(2) & 0x7FF
        else:
            _counter += 1
            if _counter > _COUNTER_MAX:
                # Counter exhausted (or clock went backwards): borrow the next millisecond.
                _last_ms += 1
                _counter = 0
        ms, counter = _last_ms, _counter
        rand_b = _random(8) & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
    made = _new_uuid(UUID)
    _set_slot(made, "int", value)
    _set_slot(made, "is_safe", _UNKNOWN)
    return made


def uuid7_timestamp_ms(value: UUID) -> int:
    """Return the Unix timestamp in milliseconds embedded in a UUIDv7.

    Example:
        >>> import time
        >>> abs(uuid7_timestamp_ms(new_id()) - time.time() * 1000) < 5000
        True
    """
    return value.int >> 80
