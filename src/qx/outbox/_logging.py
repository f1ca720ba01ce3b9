"""The relay's logging: repeated failures rate-limited, and a JSON line format.

Example:
    >>> import logging
    >>> log = RateLimitedLog(logging.getLogger("example"), every=60.0)
    >>> log.warning("broker", "broker down: %s", "refused")   # logged
    >>> log.warning("broker", "broker down: %s", "refused")   # counted, logged later
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "RateLimitedLog", "configure_logging"]


class RateLimitedLog:
    """Logs a message of one kind at most once per ``every`` seconds.

    The next message of that kind after a quiet spell says how many were left out, so an
    outage of an hour is a few lines, not one per failed publish.

    Args:
        logger: where to log.
        every: seconds between two messages of one kind.
    """

    def __init__(self, logger: logging.Logger, *, every: float = 30.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def log(self, level: int, kind: str, message: str, *args: Any) -> None:
        """Log ``message % args`` at ``level`` unless a ``kind`` message went out lately."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return
        if len(self._last) > 1000:  # kinds carry event names: keep the table small
            self._last.clear()
        self._last[kind] = now
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            message += f" ({dropped} more like this in the last {self.every:.0f}s)"
        self.logger.log(level, message, *args)

    def warning(self, kind: str, message: str, *args: Any) -> None:
        """:meth:`log` at WARNING."""
        self.log(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args: Any) -> None:
        """:meth:`log` at ERROR."""
        self.log(logging.ERROR, kind, message, *args)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` (and
    ``exception`` when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


#: The name of the handler :func:`configure_logging` installs.
HANDLER_NAME = "qx"


def configured_by_qx() -> bool:
    """Whether the command line configured logging (``--log-level`` / ``--log-json``), which
    then wins over an ``alembic.ini``'s logging sections."""
    return any(handler.name == HANDLER_NAME for handler in logging.getLogger().handlers)


def configure_logging(*, level: str, json_lines: bool) -> None:
    """Log to stderr at ``level``, as text or JSON lines (the relay process's logging)."""
    handler = logging.StreamHandler()
    handler.name = HANDLER_NAME
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
