"""The query API's parts that need no database: Q trees, cursors, coercion, sort keys."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import BigInteger, Column, Float, Integer, Numeric, SmallInteger, inspect, select
from sqlalchemy.dialects import postgresql

from qx.db.query import CursorCodec, Q
from qx.db.query._coerce import coerce_value
from qx.db.query._compiler import FilterCompiler
from qx.db.query._keyset import SortKey, keyset_condition, parse_sort
from qx.db.query._lookups import LOOKUPS
from qx.db.query._q import normalized
from qx.errors import ConfigurationError, InvalidCursor, InvalidQuery
from tests.models import Item

SECRET = "unit-test-secret-0123456789"


def test_q_combinations_keep_operands_unchanged() -> None:
    a, b = Q(rank=1), Q(name="x")
    both, either, neither = a & b, a | b, ~(a | b)
    assert (both.connector, either.connector) == ("AND", "OR")
    assert neither.negated and not either.negated
    assert a == Q(rank=1) and not a.negated
    assert (Q() & a) is a and (a | Q()) is a
    assert list((a & ~b).leaves()) == [("rank", 1), ("name", "x")]
    assert repr(~Q(rank=1)) == "~Q(rank=1)"
    with pytest.raises(InvalidQuery):
        Q({"rank": 1})  # type: ignore[arg-type]


def test_cursor_round_trip_and_every_defect() -> None:
    codec = CursorCodec(SECRET)
    token = codec.encode(sort="Item:rank,id", backward=True, values=[3, None, Decimal("1.5")])
    assert codec.decode(token, sort="Item:rank,id") == (True, [3, None, "1.5"], False)
    assert "=" not in token and "+" not in token and "/" not in token  # URL-safe
    body, _, tag = token.partition(".")
    for bad in (token[:-1], body, f"{body}x.{tag}", "", None, 42, "a.b", "é.é", "x" * 5000):
        with pytest.raises(InvalidCursor):
            codec.decode(bad, sort="Item:rank,id")
    with pytest.raises(InvalidCursor):
        codec.decode(token, sort="Item:-rank,id")
    with pytest.raises(InvalidCursor):
        CursorCodec("another-secret-0123456789").decode(token, sort="Item:rank,id")
    with pytest.raises(ConfigurationError):
        CursorCodec("short")


@pytest.mark.parametrize(
    ("type_", "value", "ok"),
    [
        (Integer(), 2**31 - 1, True),
        (Integer(), 2**31, False),
        (SmallInteger(), 40_000, False),
        (BigInteger(), 2**63 - 1, True),
        (BigInteger(), -(2**63) - 1, False),
        (Numeric(5, 2), "999.99", True),
        (Numeric(5, 2), "1000", False),
        (Numeric(5, 2), "NaN", False),
        (Float(), "inf", False),
        (Float(), "1.5", True),
    ],
)
def test_coercion_respects_the_column_range(type_: object, value: object, ok: bool) -> None:
    column = Column("n", type_)  # type: ignore[call-overload]
    if ok:
        coerce_value(column, value, field="n")
    else:
        with pytest.raises(InvalidQuery) as info:
            coerce_value(column, value, field="n")
        assert info.value.field == "n"


def test_parse_sort() -> None:
    assert parse_sort("-a, b,+c") == [("a", True), ("b", False), ("c", False)]
    assert parse_sort(["-a"]) == [("a", True)]
    for bad in ("a,,b", ["a", 1], 5, "-"):
        with pytest.raises(InvalidQuery):
            parse_sort(bad)  # type: ignore[arg-type]


def test_lookup_table_is_complete() -> None:
    assert set(LOOKUPS) == {
        "exact", "iexact", "ne", "contains", "icontains", "startswith", "istartswith",
        "endswith", "iendswith", "in", "gt", "gte", "lt", "lte", "range", "isnull",
    }  # fmt: skip


def test_keyset_condition_uses_row_values_when_it_can() -> None:
    from sqlalchemy.dialects import postgresql

    keys = (SortKey("rank", False, False), SortKey("id", False, False))
    compiled = str(keyset_condition(Item, keys, [1, 2], backward=False).compile(
        dialect=postgresql.dialect()))  # fmt: skip
    assert "(items.rank, items.id) >" in compiled
    mixed = (SortKey("score", True, True), SortKey("id", True, False))
    text = str(keyset_condition(Item, mixed, [None, 2], backward=False).compile(
        dialect=postgresql.dialect()))  # fmt: skip
    assert "items.score IS NOT NULL" in text and "OR" in text


def _checked(q: Q) -> tuple[object, str, dict[str, object]]:
    """A filter's shape, its SQL (PostgreSQL) and its parameters."""
    compiler = FilterCompiler(inspect(Item), allowed=None, owner="items", dialect="postgresql")
    checked = compiler.check(normalized(q))
    sql = str(select(Item.id).where(compiler.build(checked)).compile(dialect=postgresql.dialect()))
    return checked.shape, sql, dict(checked.params)


def test_values_are_parameters_and_what_shapes_the_sql_is_in_the_shape() -> None:
    # Same keys and lookups, other values: one shape, the same SQL, other parameters.
    first = _checked(Q(name__startswith="a%") & Q(rank__in=[1, 2]) & Q(score__range=(1, 5)))
    second = _checked(Q(name__startswith="b") & Q(rank__in=[7]) & Q(score__range=(0, 9)))
    assert first[0] == second[0] and first[1] == second[1]
    assert first[2] == {"qx_f0": "a/%", "qx_f1": [1, 2], "qx_f2_lo": 1, "qx_f2_hi": 5}
    assert second[2] == {"qx_f0": "b", "qx_f1": [7], "qx_f2_lo": 0, "qx_f2_hi": 9}
    assert "ESCAPE '/'" in first[1]
    # What changes the SQL changes the shape: None (IS NULL), isnull flags, empty lists.
    assert _checked(Q(score=None))[0] != _checked(Q(score=3))[0]
    assert "IS NULL" in _checked(Q(score=None))[1] and not _checked(Q(score=None))[2]
    assert _checked(Q(score__isnull=True))[0] != _checked(Q(score__isnull=False))[0]
    assert _checked(Q(rank__in=[]))[0] != _checked(Q(rank__in=[1]))[0]
    assert _checked(Q(rank=1) | Q(name="x"))[0] != _checked(Q(rank=1) & Q(name="x"))[0]
    assert _checked(~Q(rank=1))[0] != _checked(Q(rank=1))[0]
    # A list too long for one parameter per value is built for its values: no shape.
    assert _checked(Q(rank__in=list(range(2000))))[0] is None
