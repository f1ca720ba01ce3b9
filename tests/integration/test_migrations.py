"""qx.migrations on SQLite and PostgreSQL: upgrade, downgrade, drift, offline SQL, the CLI,
and `qx db init` for a new service."""

from __future__ import annotations

import asyncio
import io
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from alembic import command
from sqlalchemy import Column, MetaData, String, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from qx.cli import app
from qx.db import create_engine
from qx.errors import ConfigurationError
from qx.examples.orders.infrastructure import metadata as orders_metadata
from qx.migrations import (
    alembic_config,
    assert_schema_current,
    current,
    downgrade,
    project_migrations,
    schema_differences,
    upgrade,
)
from qx.settings import load_settings
from tests.integration.conftest import (
    BACKENDS,
    drop_schema,
    make_backend_engine,
    pg_url_for,
    skip_unless_runs_on,
)

pytestmark = pytest.mark.skip_on(
    "memory",
    reason="migrations build a database's schema; the testing kit makes its tables from the "
    "metadata",
)

QX_TABLES = {
    "qx_outbox",
    "qx_outbox_lane",
    "qx_outbox_relay",
    "qx_outbox_sequence",
    "qx_inbox",
    "qx_idempotency",
    "orders",
    "order_lines",
}


@pytest.fixture
async def empty(backend: str, tmp_path: Path) -> Any:
    engine, schema = await make_backend_engine(backend, tmp_path)
    try:
        yield engine
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_schema(schema)


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def test_upgrade_downgrade_upgrade_and_no_drift(empty: AsyncEngine) -> None:
    # Called from inside a running event loop: the helper uses the shared connection.
    await upgrade(empty)
    assert await tables(empty) >= QX_TABLES
    assert await current(empty) == "0006"
    await assert_schema_current(empty, orders_metadata)
    async with empty.connect() as conn:
        # What autogenerate would write against head: nothing, not even for unknown tables.
        everything = await conn.run_sync(
            lambda c: schema_differences(c, orders_metadata, only_known_tables=False)
        )
    assert everything == []
    await downgrade(empty, "base")
    assert not (QX_TABLES & await tables(empty))
    assert await current(empty) is None
    await upgrade(empty)
    assert await tables(empty) >= QX_TABLES
    await assert_schema_current(empty, orders_metadata)


async def test_drift_is_reported_column_by_column(empty: AsyncEngine) -> None:
    await upgrade(empty)
    changed = MetaData(naming_convention=orders_metadata.naming_convention)
    for table in orders_metadata.tables.values():
        table.to_metadata(changed)
    orders = changed.tables["orders"]
    orders.append_column(Column("note", String(100), nullable=True))
    orders.c.customer.type = String(300)
    with pytest.raises(ConfigurationError) as info:
        await assert_schema_current(empty, changed)
    message = str(info.value)
    assert "2 differences" in message
    assert "missing column orders.note" in message
    assert "column orders.customer: type VARCHAR(200) in the database, VARCHAR(300)" in message


@pytest.mark.postgres_only
async def test_the_notify_trigger_comes_with_the_migration(empty: AsyncEngine) -> None:
    await upgrade(empty)
    async with empty.connect() as conn:
        triggers = await conn.scalar(
            text("SELECT count(*) FROM pg_trigger WHERE tgname = 'qx_outbox_notify'")
        )
    assert triggers and triggers >= 1


def test_offline_sql_contains_the_outbox_ddl(monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("postgresql+asyncpg://u@h/db", "sqlite+aiosqlite:///x.sqlite3"):
        monkeypatch.setenv("QX_DB__URL", url)
        buffer = io.StringIO()
        config = alembic_config()
        config.output_buffer = buffer
        command.upgrade(config, "head", sql=True)  # no database is contacted
        sql = buffer.getvalue()
        assert "CREATE TABLE qx_outbox" in sql and "CREATE TABLE qx_inbox" in sql
        assert "ix_qx_outbox_ready" in sql and "CREATE TABLE orders" in sql
        assert "CREATE TABLE qx_outbox_lane" in sql
        if url.startswith("postgresql"):
            assert "JSONB" in sql and "CREATE TRIGGER qx_outbox_notify" in sql
        else:
            assert "AUTOINCREMENT" in sql and "TRIGGER" not in sql


# -- the command line (synchronous tests: `qx db` runs its own event loop) -------------------


@pytest.fixture(params=BACKENDS)
def empty_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    skip_unless_runs_on(request.node, request.param)

    async def make() -> tuple[str, str | None]:
        engine, schema = await make_backend_engine(request.param, tmp_path)
        url = pg_url_for(engine)
        await engine.dispose()
        return url, schema

    url, schema = asyncio.run(make())
    monkeypatch.setenv("QX_DB__URL", url)
    if schema is not None:
        monkeypatch.setenv("QX_DB__SEARCH_PATH", schema)
    try:
        yield url
    finally:
        if schema is not None:
            asyncio.run(drop_schema(schema))


def _execute(sql: str) -> None:
    async def run() -> None:
        engine = create_engine(load_settings().db)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_db_commands_and_check_exit_codes(empty_url: str) -> None:
    runner = CliRunner()
    location = ["-c", str(project_migrations())]
    behind = runner.invoke(app, ["db", "check", *location])
    assert behind.exit_code == 1 and "not up to date" in behind.output
    assert runner.invoke(app, ["db", "upgrade", *location]).exit_code == 0
    current_output = runner.invoke(app, ["db", "current", *location])
    assert current_output.exit_code == 0 and "0006 (head)" in current_output.output
    clean = runner.invoke(app, ["db", "check", *location])
    assert clean.exit_code == 0 and "schema is current" in clean.output
    _execute("ALTER TABLE orders ADD COLUMN note VARCHAR(10)")
    drifted = runner.invoke(app, ["db", "check", *location])
    assert drifted.exit_code == 1
    assert "column orders.note is not in the code" in drifted.output
    # A relative step back, as its help offers.
    back = runner.invoke(app, ["db", "downgrade", "-1", *location])
    assert back.exit_code == 0, back.output
    after = runner.invoke(app, ["db", "current", *location])
    assert "0005" in after.output and "0006" not in after.output
    assert runner.invoke(app, ["db", "downgrade", "base", *location]).exit_code == 0


def test_bad_database_urls_are_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    location = ["-c", str(project_migrations())]
    for url, expected in (
        ("postgresql+asyncpg://postgres@127.0.0.1:1/none", "cannot reach the database"),
        ("mysql://somewhere/db", "unsupported database"),
    ):
        monkeypatch.setenv("QX_DB__URL", url)
        result = runner.invoke(app, ["db", "upgrade", *location])
        assert result.exit_code == 1, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert runner.invoke(app, ["db", "current", "-c", "/nonexistent/alembic.ini"]).exit_code == 1


def test_db_init_writes_an_environment_that_upgrades(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"svc_models_{uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy import Column, Integer, String, Table
            from qx.db import make_metadata

            metadata = make_metadata()
            Table("widgets", metadata, Column("id", Integer, primary_key=True),
                  Column("name", String(50), nullable=False))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QX_DB__URL", f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}")
    runner = CliRunner()
    init = runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"])
    assert init.exit_code == 0, init.output
    assert (tmp_path / "alembic.ini").is_file()
    assert (tmp_path / "migrations" / "env.py").read_text().count(module) == 1
    again = runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    bad = runner.invoke(app, ["db", "init", "--metadata", "no-colon", "--directory", "x"])
    assert bad.exit_code == 1
    try:
        made = runner.invoke(app, ["db", "revision", "--autogenerate", "-m", "initial"])
        assert made.exit_code == 0, made.output
        (revision,) = (tmp_path / "migrations" / "versions").glob("*_initial.py")
        assert "widgets" in revision.read_text() and "qx_outbox" in revision.read_text()
        rev_id = revision.name.split("_")[1]
        heads = runner.invoke(app, ["db", "heads"])
        assert heads.exit_code == 0 and rev_id in heads.output, heads.output
        history = runner.invoke(app, ["db", "history"])
        assert history.exit_code == 0 and "initial" in history.output
        shown = runner.invoke(app, ["db", "show", "head"])
        assert shown.exit_code == 0 and rev_id in shown.output
        assert runner.invoke(app, ["db", "stamp", "head"]).exit_code == 0  # recorded, not run
        assert runner.invoke(app, ["db", "stamp", "base"]).exit_code == 0
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        assert runner.invoke(app, ["db", "check"]).exit_code == 0
        empty = runner.invoke(app, ["db", "revision", "-m", "second"])  # no autogenerate
        assert empty.exit_code == 0 and len(list(revision.parent.glob("*.py"))) == 2
    finally:
        sys.modules.pop(module, None)
    import sqlite3

    with sqlite3.connect(tmp_path / "svc.sqlite3") as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"widgets", "qx_outbox", "qx_inbox", "alembic_version"} <= names


@pytest.mark.postgres_only
def test_a_service_s_own_autogenerated_migration_brings_the_notify_trigger(
    empty_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The documented path (qx db init, alembic revision --autogenerate, qx db upgrade) on
    # PostgreSQL: the trigger comes with the outbox, and qx db check misses it when gone.
    module = f"svc_models_{uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy import Column, Integer, Table
            from qx.db import make_metadata

            metadata = make_metadata()
            Table("gadgets", metadata, Column("id", Integer, primary_key=True))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
    try:
        command.revision(alembic_config("alembic.ini"), message="initial", autogenerate=True)
        (revision,) = (tmp_path / "migrations" / "versions").glob("*_initial.py")
        written = revision.read_text()
        assert "op.create_outbox_notify('qx_outbox')" in written, written
        assert "op.drop_outbox_notify('qx_outbox')" in written and "import qx.migrations" in written
        upgraded = runner.invoke(app, ["db", "upgrade"])
        assert upgraded.exit_code == 0, upgraded.output
        clean = runner.invoke(app, ["db", "check"])
        assert clean.exit_code == 0, clean.output
        _execute("DROP TRIGGER qx_outbox_notify ON qx_outbox")
        missing = runner.invoke(app, ["db", "check"])
        assert missing.exit_code == 1
        assert "missing NOTIFY trigger qx_outbox_notify on qx_outbox" in missing.output
        # And the next autogenerated revision puts it back.
        command.revision(alembic_config("alembic.ini"), message="again", autogenerate=True)
        (again,) = (tmp_path / "migrations" / "versions").glob("*_again.py")
        assert "op.create_outbox_notify('qx_outbox')" in again.read_text()
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        assert runner.invoke(app, ["db", "check"]).exit_code == 0
        assert runner.invoke(app, ["db", "downgrade", "base"]).exit_code == 0
    finally:
        sys.modules.pop(module, None)


@pytest.mark.postgres_only
async def test_version_table_in_its_own_schema(empty: AsyncEngine) -> None:
    schema = f"qx_versions_{uuid4().hex[:8]}"
    async with empty.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        config = alembic_config()
        config.set_main_option("version_table_schema", schema)
        await upgrade(empty, config=config)
        assert await current(empty, version_table_schema=schema) == "0006"
        assert await current(empty) is None  # nothing in the default schema
        async with empty.connect() as conn:
            found = await conn.scalar(
                text(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = :s AND table_name = 'alembic_version'"
                ),
                {"s": schema},
            )
        assert found == 1
    finally:
        async with empty.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
