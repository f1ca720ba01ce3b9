"""Settings, URL handling, SQLSTATE translation and value coercion (no services)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime
from decimal import Decimal
from uuid import UUID

import pytest
from sqlalchemy import Boolean, Column, Date, Integer, Numeric, String, Uuid

from qx.db import json_column, parse_database_url
from qx.db._translate import error_for_sqlstate, translate_error
from qx.db.query._coerce import coerce_value
from qx.db.types import UtcDateTime
from qx.errors import (
    ConfigurationError,
    DatabaseError,
    DuplicateKey,
    IntegrityViolation,
    InvalidQuery,
    StatementTimeout,
    TransientError,
)
from qx.settings import load_settings


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QX_DB__URL", "postgresql://u@h/db")
    monkeypatch.setenv("QX_DB__STATEMENT_TIMEOUT", "2.5")
    monkeypatch.setenv("QX_BROKER__URL", "nats://127.0.0.1:4222")
    settings = load_settings()
    assert settings.db.url == "postgresql://u@h/db"
    assert settings.db.statement_timeout == 2.5
    assert settings.broker.url == "nats://127.0.0.1:4222"
    assert load_settings(_env_file=None).db.pool_size == 10


def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QX_DB__POOL_SIZE", "lots")
    with pytest.raises(ConfigurationError, match="QX_DB__POOL_SIZE"):
        load_settings()


def test_replicas_come_from_one_json_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "QX_DB__REPLICAS",
        '[{"url": "postgresql://u@r1/db"}, {"url": "postgresql://u@r2/db", "weight": 3,'
        ' "pool_size": 4}]',
    )
    monkeypatch.setenv("QX_DB__REPLICA_WAIT", "0.5")
    settings = load_settings()
    assert [(r.url, r.weight, r.pool_size) for r in settings.db.replicas] == [
        ("postgresql://u@r1/db", 1, 10),
        ("postgresql://u@r2/db", 3, 4),
    ]
    assert settings.db.replica_wait == 0.5
    monkeypatch.setenv("QX_DB__REPLICAS", '[{"url": "postgresql://u@r1/db", "weight": -1}]')
    with pytest.raises(ConfigurationError, match="QX_DB__REPLICAS"):
        load_settings()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+asyncpg"),
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite"),
    ],
)
def test_urls_are_normalised_to_async_drivers(url: str, expected: str) -> None:
    assert parse_database_url(url).drivername == expected


@pytest.mark.parametrize(
    ("sqlstate", "cls"),
    [
        ("23505", DuplicateKey),
        ("23503", IntegrityViolation),
        ("23514", IntegrityViolation),
        ("23502", IntegrityViolation),
        ("40001", TransientError),
        ("40P01", TransientError),
        ("08006", TransientError),
        ("57014", StatementTimeout),
        ("42601", DatabaseError),
        (None, DatabaseError),
    ],
)
def test_sqlstate_table(sqlstate: str | None, cls: type) -> None:
    assert type(error_for_sqlstate(sqlstate, "x")) is cls


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("SQLITE_CONSTRAINT_UNIQUE", DuplicateKey),
        ("SQLITE_CONSTRAINT_PRIMARYKEY", DuplicateKey),
        ("SQLITE_CONSTRAINT_FOREIGNKEY", IntegrityViolation),
        ("SQLITE_CONSTRAINT_NOTNULL", IntegrityViolation),
        ("SQLITE_CONSTRAINT_CHECK", IntegrityViolation),
        ("SQLITE_BUSY", TransientError),
        ("SQLITE_BUSY_SNAPSHOT", TransientError),
    ],
)
def test_sqlite_codes_map_through_sqlstate(code: str, cls: type) -> None:
    error = sqlite3.IntegrityError("boom")
    error.sqlite_errorname = code  # type: ignore[attr-defined]
    assert type(translate_error(error)) is cls


def test_non_database_errors_are_not_translated() -> None:
    assert translate_error(ValueError("x")) is None


@pytest.mark.parametrize(
    ("column", "raw", "expected"),
    [
        (Column("i", Integer()), "42", 42),
        (Column("i", Integer()), -3, -3),
        (
            Column("u", Uuid()),
            "0190b3f2-0000-7000-8000-000000000000",
            UUID("0190b3f2-0000-7000-8000-000000000000"),
        ),
        (Column("n", Numeric()), "1.50", Decimal("1.50")),
        (Column("b", Boolean()), "true", True),
        (Column("b", Boolean()), "0", False),
        (Column("d", Date()), "2030-01-02", date(2030, 1, 2)),
        (
            Column("t", UtcDateTime()),
            "2030-01-02T03:04:05Z",
            datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
        (Column("s", String()), "text", "text"),
        (Column("s", String()), None, None),
    ],
)
def test_coerce_accepts_typed_and_string_values(
    column: Column, raw: object, expected: object
) -> None:  # type: ignore[type-arg]
    assert coerce_value(column, raw, field=column.name) == expected


@pytest.mark.parametrize(
    ("column", "raw"),
    [
        (Column("i", Integer()), "4x"),
        (Column("i", Integer()), True),
        (Column("i", Integer()), 1.5),
        (Column("u", Uuid()), "nope"),
        (Column("n", Numeric()), "NaN"),
        (Column("b", Boolean()), "maybe"),
        (Column("d", Date()), "yesterday"),
        (Column("t", UtcDateTime()), "2030-01-02T03:04:05"),
        (Column("s", String()), 5),
        (Column("s", String()), "nul\x00byte"),
        (json_column("j"), "x"),
    ],
)
def test_coerce_rejects_bad_values_naming_the_field(column: Column, raw: object) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidQuery) as info:
        coerce_value(column, raw, field=column.name)
    assert info.value.field == column.name
    assert repr(column.name) in str(info.value)
