"""Opaque, signed keyset-pagination cursors.

A cursor is ``base64url(JSON payload) "." base64url(HMAC-SHA256(secret, payload)[:16])``. The
payload holds a format version, the sort it was made for (entity and keys, so a cursor cannot
be replayed against another sort), the direction and the sort-key values of the boundary row.
Clients cannot read meaning into it or forge one; every defect is ``InvalidCursor``.

Example:
    >>> codec = CursorCodec("a-secret-of-at-least-16-chars")
    >>> token = codec.encode(sort="Order:-created_at,id", backward=False, values=[1, "x"])
    >>> codec.decode(token, sort="Order:-created_at,id")
    (False, [1, 'x'])
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

from pydantic import SecretStr

from qx.core._errors import ConfigurationError, InvalidCursor

__all__ = ["CursorCodec"]

_VERSION: Final = 1
_MAX_LENGTH: Final = 4096
_TAG_BYTES: Final = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def _plain(value: Any) -> Any:
    # JSON has no UUID/Decimal/datetime: send their text; decoding coerces by column type.
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


class CursorCodec:
    """Signs and checks cursors with one secret.

    Args:
        secret: at least 16 characters (or bytes) of key material.

    Raises:
        ConfigurationError: the secret is missing or too short.
    """

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes | SecretStr) -> None:
        raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        key = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
        if len(key) < 16:
            raise ConfigurationError(
                "the cursor secret (QX_PAGINATION_SECRET) must be at least 16 characters"
            )
        self._key = key

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_TAG_BYTES]

    def encode(self, *, sort: str, backward: bool, values: list[Any]) -> str:
        """Return the cursor for the row with sort-key ``values`` in ``sort``."""
        payload = {"v": _VERSION, "s": sort, "b": backward, "k": [_plain(v) for v in values]}
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return f"{_b64(body)}.{_b64(self._tag(body))}"

    def decode(self, token: object, *, sort: str) -> tuple[bool, list[Any]]:
        """Check ``token`` and return ``(backward, values)``.

        Raises:
            InvalidCursor: malformed, truncated, tampered with, signed with another secret,
                or made for another sort.
        """
        if not isinstance(token, str) or not token or len(token) > _MAX_LENGTH:
            raise InvalidCursor("invalid cursor", field="cursor")
        body_text, dot, tag_text = token.partition(".")
        if not dot:
            raise InvalidCursor("invalid cursor: malformed", field="cursor")
        try:
            body, tag = _unb64(body_text), _unb64(tag_text)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise InvalidCursor("invalid cursor: malformed", field="cursor") from None
        if not hmac.compare_digest(tag, self._tag(body)):
            raise InvalidCursor("invalid cursor: signature does not match", field="cursor")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):  # pragma: no cover - signed, so ours
            raise InvalidCursor("invalid cursor: malformed", field="cursor") from None
        if not isinstance(payload, dict) or payload.get("v") != _VERSION:
            raise InvalidCursor("invalid cursor: unknown format", field="cursor")
        if payload.get("s") != sort:
            raise InvalidCursor("cursor was made for another sort order", field="cursor")
        backward, values = payload.get("b"), payload.get("k")
        if not isinstance(backward, bool) or not isinstance(values, list):
            raise InvalidCursor("invalid cursor: malformed", field="cursor")
        return backward, values
