"""Cursors and consistency tokens are signed by one rule (``qx.db._signing``); each kind
refuses what it did not issue, with its own typed error naming the field."""

from __future__ import annotations

import pytest

from qx.db._replicas import ConsistencyTokens
from qx.db.query import CursorCodec
from qx.errors import InvalidConsistencyToken, InvalidCursor

SECRET = "a-secret-of-at-least-16-chars"


@pytest.mark.parametrize("token", ["", "no-dot", "é.é", "!!!.???", "a.b.c", "x" * 600, 5])
def test_a_consistency_token_that_is_not_one_is_refused(token: object) -> None:
    with pytest.raises(InvalidConsistencyToken) as caught:
        ConsistencyTokens(SECRET).read(token, tenant=None)
    assert caught.value.field == "consistency_token"
    assert len(str(caught.value)) < 200


def test_one_secret_never_makes_a_cursor_pass_for_a_consistency_token() -> None:
    cursor = CursorCodec(SECRET).encode(sort="id", backward=False, values=[1])
    with pytest.raises(InvalidConsistencyToken, match="not signed by this service"):
        ConsistencyTokens(SECRET).read(cursor, tenant=None)
    token = ConsistencyTokens(SECRET).issue(42, tenant=None)
    with pytest.raises(InvalidCursor, match="signature does not match"):
        CursorCodec(SECRET).decode(token, sort="id")


def test_each_kind_reads_back_what_it_issued() -> None:
    tokens = ConsistencyTokens(SECRET)
    assert tokens.read(tokens.issue(42, tenant="t1"), tenant="t1") == 42
    codec = CursorCodec(SECRET)
    assert codec.decode(codec.encode(sort="id", backward=True, values=[7]), sort="id").values == [7]


@pytest.mark.parametrize("token", ["no-dot", "é.é"])
def test_a_cursor_that_is_not_one_is_malformed(token: str) -> None:
    with pytest.raises(InvalidCursor, match="malformed"):
        CursorCodec(SECRET).decode(token, sort="id")
