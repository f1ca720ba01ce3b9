"""Opaque, signed keyset-pagination cursors.

A cursor is ``base64url(body) "." base64url(HMAC-SHA256(secret, body)[:16])``. The body is a
JSON payload (compressed when long) holding a format version, the sort it was made for
(entity and keys, so a cursor cannot be replayed against another sort), the direction, and
either the sort-key values of the boundary row or - when those would make a cursor too long
to be sent back (sorting by a long text column) - the boundary row's primary key, whose sort
values are then read back from the database. Clients cannot read meaning into a cursor or
forge one; every defect is ``InvalidCursor``, and every cursor qx issues is accepted back.

Example:
    >>> codec = CursorCodec("a-secret-of-at-least-16-chars")
    >>> token = codec.encode(sort="Order:-created_at,id", backward=False, values=[1, "x"])
    >>> codec.decode(token, sort="Order:-created_at,id")
    Boundary(backward=False, values=[1, 'x'], by_key=False)
"""

from __future__ import annotations

import json
import zlib
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final, NamedTuple
from uuid import UUID

from pydantic import SecretStr

from qx.core._errors import ConfigurationError, InvalidCursor
from qx.db._signing import BadSeal, Signer, key_of

__all__ = ["MAX_CURSOR", "Boundary", "CursorCodec"]

_VERSION: Final = 2
#: The longest cursor accepted, and so the longest issued (a cursor travels in a URL).
MAX_CURSOR: Final = 4096
_COMPRESS_FROM: Final = 256  # bytes of JSON
_MAX_BODY: Final = 64 * 1024  # bytes a compressed body may expand to


class Boundary(NamedTuple):
    """What a cursor says: the direction, and the boundary row's sort values - or, with
    ``by_key``, its primary key values."""

    backward: bool
    values: list[Any]
    by_key: bool


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

    __slots__ = ("_signer",)

    def __init__(self, secret: str | bytes | SecretStr) -> None:
        key = key_of(secret)
        if len(key) < 16:
            raise ConfigurationError(
                "the cursor secret (QX_PAGINATION_SECRET) must be at least 16 characters"
            )
        self._signer = Signer(key)

    def _token(self, payload: dict[str, Any]) -> str:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        data = text.encode("utf-8", "surrogatepass")
        body = b"z" + zlib.compress(data, 9) if len(data) >= _COMPRESS_FROM else b"j" + data
        return self._signer.seal(body)

    def encode(
        self, *, sort: str, backward: bool, values: list[Any], key: list[Any] | None = None
    ) -> str:
        """Return the cursor for the row with sort-key ``values`` in ``sort``.

        When that cursor would be longer than :data:`MAX_CURSOR`, and the row's primary key
        ``key`` is given, the cursor names the row by its key instead.
        """
        token = self._token(
            {"v": _VERSION, "s": sort, "b": backward, "k": [_plain(v) for v in values]}
        )
        if len(token) > MAX_CURSOR and key is not None:
            token = self._token(
                {"v": _VERSION, "s": sort, "b": backward, "r": [_plain(v) for v in key]}
            )
        return token

    def decode(self, token: object, *, sort: str) -> Boundary:
        """Check ``token`` and return what it says.

        Raises:
            InvalidCursor: malformed, truncated, tampered with, signed with another secret,
                or made for another sort.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_CURSOR:
            raise InvalidCursor("invalid cursor", field="cursor")
        try:
            body = self._signer.open(token)
        except BadSeal as bad:
            problem = "signature does not match" if bad.reason == "signature" else "malformed"
            raise InvalidCursor(f"invalid cursor: {problem}", field="cursor") from None
        payload = _payload(body)
        if not isinstance(payload, dict) or payload.get("v") != _VERSION:
            raise InvalidCursor("invalid cursor: unknown format", field="cursor")
        if payload.get("s") != sort:
            raise InvalidCursor("cursor was made for another sort order", field="cursor")
        backward = payload.get("b")
        by_key = "r" in payload
        values = payload.get("r") if by_key else payload.get("k")
        if not isinstance(backward, bool) or not isinstance(values, list):
            raise InvalidCursor("invalid cursor: malformed", field="cursor")
        return Boundary(backward, values, by_key)


def _payload(body: bytes) -> Any:
    # Signed, so ours: still decoded defensively (a changed secret must never crash).
    try:
        if body[:1] == b"z":
            inflater = zlib.decompressobj()
            data = inflater.decompress(body[1:], _MAX_BODY)
            if inflater.unconsumed_tail:
                raise ValueError("too large")
        elif body[:1] == b"j":
            data = body[1:]
        else:
            raise ValueError("unknown body")
        return json.loads(data.decode("utf-8", "surrogatepass"))
    except (ValueError, zlib.error, UnicodeDecodeError):
        raise InvalidCursor("invalid cursor: malformed", field="cursor") from None
