"""Signed tokens handed to clients and read back: ``<body>.<tag>``, both base64url.

Cursors and consistency tokens travel through clients (URLs, headers) and must come back
unchanged: the body is signed with HMAC-SHA256 (tag cut to 16 bytes, compared in constant
time). One rule for both, so a change to how qx signs is made once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Final, Literal

from pydantic import SecretStr

__all__ = ["BadSeal", "Signer", "key_of"]

_TAG_BYTES: Final = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def key_of(secret: str | bytes | SecretStr) -> bytes:
    """The key material of a configured secret."""
    raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)


class BadSeal(ValueError):
    """A token that is not ``body.tag`` (``"malformed"``) or whose tag does not match
    (``"signature"``); the caller turns it into its own error."""

    def __init__(self, reason: Literal["malformed", "signature"]) -> None:
        super().__init__(reason)
        self.reason = reason


class Signer:
    """Seals bodies with one key and opens what it sealed.

    Args:
        key: the key material.
        purpose: when given, the key is derived for this purpose only, so tokens of one
            kind are never accepted as another's.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes, *, purpose: bytes | None = None) -> None:
        self._key = key if purpose is None else hmac.new(key, purpose, hashlib.sha256).digest()

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_TAG_BYTES]

    def seal(self, body: bytes) -> str:
        """``body`` and its tag, as text."""
        return f"{_b64(body)}.{_b64(self._tag(body))}"

    def open(self, token: str) -> bytes:
        """The body of a token this signer sealed.

        Raises:
            BadSeal: malformed, or signed with another key (or changed).
        """
        body_text, dot, tag_text = token.partition(".")
        if not dot:
            raise BadSeal("malformed")
        try:
            body, tag = _unb64(body_text), _unb64(tag_text)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise BadSeal("malformed") from None
        if not hmac.compare_digest(tag, self._tag(body)):
            raise BadSeal("signature")
        return body
