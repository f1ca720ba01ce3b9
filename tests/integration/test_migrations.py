"""qx.migrations on SQLite and PostgreSQL: upgrade, downgrade, drift, offline SQL, the CLI,
and `qx db init` for a new service."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import subprocess
import sys
import sysconfig
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
from qx.db import create_engine, make_metadata
from qx.errors import ConfigurationError
from qx.examples.orders.infrastructure import metadata as orders_metadata
from qx.examples.orders.infrastructure import migrations as orders_migrations
from qx.migrations import (
    alembic_config,
    assert_schema_current,
    current,
    downgrade,
    project_migrations,
    schema_differences,
    upgrade,
)
from qx.migrations._placement import qx_versions
from qx.migrations._trigger import NOTIFY_FUNCTION_SQL, NOTIFY_TRIGGER_SQL
from qx.outbox import include_qx_tables
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
    "qx_inbox_sequence",
    "qx_inbox_parked",
    "qx_inbox_lane",
    "qx_inbox_member",
    "qx_idempotency",
    "qx_commit",
}
#: qx's newest revision, and the one before it.
QX_HEAD = "qx_0010"
QX_PREVIOUS = "qx_0009"
ORDERS_TABLES = {"orders", "order_lines", "products"}


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


def qx_only_metadata() -> MetaData:
    metadata = make_metadata()
    include_qx_tables(metadata)
    return metadata


async def heads(engine: AsyncEngine) -> set[str]:
    return set((await current(engine) or "").split(",")) - {""}


async def test_qx_chain_brings_qx_tables_only_and_the_example_chain_depends_on_it(
    empty: AsyncEngine,
) -> None:
    # Called from inside a running event loop: the helper uses the shared connection.
    await upgrade(empty)
    assert await tables(empty) == QX_TABLES | {"alembic_version"}  # no example tables
    assert await heads(empty) == {QX_HEAD}
    await assert_schema_current(empty, qx_only_metadata())
    # The example is laid out as a service: its own chain on top of qx's.
    example = alembic_config(orders_migrations())
    await upgrade(empty, config=example)
    assert await tables(empty) == QX_TABLES | ORDERS_TABLES | {"alembic_version"}
    assert await heads(empty) == {QX_HEAD, "orders_0002"}
    async with empty.connect() as conn:
        # What autogenerate would write against head: nothing, not even for unknown tables.
        everything = await conn.run_sync(
            lambda c: schema_differences(c, orders_metadata, only_known_tables=False)
        )
    assert everything == []
    await downgrade(empty, "orders@base", config=example)
    assert await tables(empty) == QX_TABLES | {"alembic_version"}
    await downgrade(empty, "base")
    assert not (QX_TABLES & await tables(empty))
    assert await current(empty) is None
    await upgrade(empty, config=example)
    await assert_schema_current(empty, orders_metadata)


async def test_a_database_of_the_earlier_single_chain_is_adopted(empty: AsyncEngine) -> None:
    # Before qx's tables were a branch of their own, one chain 0001-0006 held them and the
    # example's: such a database upgrades in place, whichever environment runs it.
    example = alembic_config(orders_migrations())
    await upgrade(empty, config=example)

    async def stamp_as_single_chain() -> None:
        async with empty.begin() as conn:
            await conn.execute(text("DELETE FROM alembic_version"))
            await conn.execute(text("INSERT INTO alembic_version VALUES ('0006')"))
            # What qx revisions after the single chain added is not there yet.
            await conn.execute(text("DROP TABLE IF EXISTS qx_inbox_sequence"))
            await conn.execute(text("DROP TABLE IF EXISTS qx_inbox_parked"))
            await conn.execute(text("DROP TABLE IF EXISTS qx_inbox_lane"))
            await conn.execute(text("DROP TABLE IF EXISTS qx_inbox_member"))
            await conn.execute(text("DROP TABLE IF EXISTS qx_commit"))

    await stamp_as_single_chain()
    await upgrade(empty)
    assert await heads(empty) == {QX_HEAD}
    await stamp_as_single_chain()
    await upgrade(empty, config=example)
    assert await heads(empty) == {QX_HEAD, "orders_0002"}
    await assert_schema_current(empty, orders_metadata)


async def test_drift_is_reported_column_by_column(empty: AsyncEngine) -> None:
    await upgrade(empty, config=alembic_config(orders_migrations()))
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
async def test_qx_0005_drops_the_notify_trigger_and_its_downgrade_puts_it_back(
    empty: AsyncEngine,
) -> None:
    # A database at qx_0004 has the trigger; qx_0005 takes it (and its function) away.
    async def triggers() -> int:
        async with empty.connect() as conn:
            found = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_trigger WHERE tgname = 'qx_outbox_notify'"
                    " AND tgrelid = to_regclass('qx_outbox')"
                )
            )
            function = await conn.scalar(text("SELECT to_regproc('qx_outbox_notify')"))
        return int(found or 0) + (function is not None)

    await upgrade(empty, "qx_0004")
    assert await triggers() == 2
    await upgrade(empty)
    assert await triggers() == 0
    await downgrade(empty, "qx_0004")
    assert await triggers() == 2
    await downgrade(empty, "base")


async def test_qx_0006_indexes_only_published_rows_by_published_at(
    empty: AsyncEngine, backend: str
) -> None:
    # Pending rows are not in ix_qx_outbox_published_at any more: nothing can answer
    # "published_at IS NULL" through it (the relay's mark walked its NULL entries).
    def definition(conn: Any) -> str:
        (found,) = [
            i for i in inspect(conn).get_indexes("qx_outbox")
            if i["name"] == "ix_qx_outbox_published_at"
        ]  # fmt: skip
        where = found.get("dialect_options", {}).get(f"{backend}_where")
        return "" if where is None else str(where)

    await upgrade(empty, "qx_0005")
    async with empty.connect() as conn:
        assert await conn.run_sync(definition) == ""
    await upgrade(empty)
    async with empty.connect() as conn:
        assert "published_at IS NOT NULL" in await conn.run_sync(definition)
    await downgrade(empty, "qx_0005")
    async with empty.connect() as conn:
        assert await conn.run_sync(definition) == ""
    await downgrade(empty, "base")


def test_offline_sql_contains_the_outbox_ddl(monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("postgresql+asyncpg://u@h/db", "sqlite+aiosqlite:///x.sqlite3"):
        monkeypatch.setenv("QX_DB__URL", url)
        outputs = []
        for config in (alembic_config(), alembic_config(orders_migrations())):
            config.output_buffer = io.StringIO()
            command.upgrade(config, "heads", sql=True)  # no database is contacted
            outputs.append(config.output_buffer.getvalue())
        sql, example_sql = outputs
        assert "CREATE TABLE qx_outbox" in sql and "CREATE TABLE qx_inbox" in sql
        assert "ix_qx_outbox_ready" in sql and "CREATE TABLE orders" not in sql
        assert "CREATE TABLE qx_outbox_lane" in sql
        assert "CREATE TABLE qx_outbox" in example_sql and "CREATE TABLE orders" in example_sql
        if url.startswith("postgresql"):
            assert "JSONB" in sql and "CREATE TRIGGER qx_outbox_notify" in sql  # qx_0001
            assert sql.index("CREATE TRIGGER") < sql.index("DROP TRIGGER IF EXISTS qx_outbox")
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
    assert current_output.exit_code == 0 and f"{QX_HEAD} (head)" in current_output.output
    clean = runner.invoke(app, ["db", "check", *location])
    assert clean.exit_code == 0 and "schema is current" in clean.output
    _execute("ALTER TABLE qx_inbox ADD COLUMN note VARCHAR(10)")
    drifted = runner.invoke(app, ["db", "check", *location])
    assert drifted.exit_code == 1
    assert "column qx_inbox.note is not in the code" in drifted.output
    # A relative step back, as its help offers.
    back = runner.invoke(app, ["db", "downgrade", "-1", *location])
    assert back.exit_code == 0, back.output
    after = runner.invoke(app, ["db", "current", *location])
    assert QX_PREVIOUS in after.output and QX_HEAD not in after.output
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


def _service(tmp_path: Path, body: str) -> str:
    """A service's models module in tmp_path; returns its module name."""
    module = f"svc_models_{uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    return module


WIDGETS = """
    from sqlalchemy import Column, Integer, String, Table
    from qx.db import make_metadata
    from qx.db.types import UtcDateTime

    metadata = make_metadata()
    Table("widgets", metadata, Column("id", Integer, primary_key=True),
          Column("name", String(50), nullable=False),
          Column("made_at", UtcDateTime(), nullable=True))
    """


def _sqlite_tables(path: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_db_init_then_a_service_s_chain_on_top_of_qx_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _service(tmp_path, WIDGETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QX_DB__URL", f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}")
    runner = CliRunner()
    init = runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"])
    assert init.exit_code == 0, init.output
    assert "qx db upgrade" in init.output  # says what to run next
    assert (tmp_path / "alembic.ini").is_file()
    assert (tmp_path / "migrations" / "env.py").read_text().count(module) == 1
    again = runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    bad = runner.invoke(app, ["db", "init", "--metadata", "no-colon", "--directory", "x"])
    assert bad.exit_code == 1
    versions = tmp_path / "migrations" / "versions"
    try:
        # Autogenerate before the database holds qx's chain would copy qx's tables: refused.
        early = runner.invoke(app, ["db", "revision", "--autogenerate", "-m", "initial"])
        assert early.exit_code == 1 and "run `qx db upgrade` first" in early.output
        assert list(versions.glob("*.py")) == []
        upgraded = runner.invoke(app, ["db", "upgrade"])  # qx's chain: qx's tables
        assert upgraded.exit_code == 0, upgraded.output
        assert _sqlite_tables(tmp_path / "svc.sqlite3") >= {"qx_outbox", "qx_inbox"}
        made = runner.invoke(app, ["db", "revision", "--autogenerate", "-m", "initial"])
        assert made.exit_code == 0, made.output
        (revision,) = versions.glob("*_initial.py")
        written = revision.read_text()
        assert "widgets" in written and "qx_outbox" not in written  # qx's tables stay qx's
        assert f"depends_on: str | Sequence[str] | None = '{QX_HEAD}'" in written
        assert written.count("import qx.db.types") == 1 and "qx.db.types.UtcDateTime()" in written
        rev_id = revision.name.split("_")[1]
        heads = runner.invoke(app, ["db", "heads"])
        assert heads.exit_code == 0 and rev_id in heads.output and QX_HEAD in heads.output
        history = runner.invoke(app, ["db", "history"])
        assert history.exit_code == 0 and "initial" in history.output
        shown = runner.invoke(app, ["db", "show", rev_id])
        assert shown.exit_code == 0 and rev_id in shown.output
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        checked = runner.invoke(app, ["db", "check"])
        assert checked.exit_code == 0, checked.output
        second = runner.invoke(app, ["db", "revision", "-m", "second"])  # on the service's head
        assert second.exit_code == 0, second.output
        (follow,) = versions.glob("*_second.py")
        assert f"down_revision: str | Sequence[str] | None = '{rev_id}'" in follow.read_text()
        assert "depends_on: str | Sequence[str] | None = None" in follow.read_text()
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        current_output = runner.invoke(app, ["db", "current"])
        assert (
            QX_HEAD in current_output.output and follow.name.split("_")[1] in current_output.output
        )
        assert runner.invoke(app, ["db", "stamp", "heads"]).exit_code == 0  # recorded, not run
    finally:
        sys.modules.pop(module, None)
    assert {"widgets", "qx_outbox", "qx_inbox", "alembic_version"} <= _sqlite_tables(
        tmp_path / "svc.sqlite3"
    )


def test_a_new_qx_revision_arrives_without_editing_the_service_s_revisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service migrates with this qx; then qx is upgraded to a release whose chain has one
    # more revision. The service's next `qx db upgrade` applies it, with its files untouched.
    import shutil
    import subprocess

    import qx

    service = tmp_path / "service"
    service.mkdir()
    module = _service(service, WIDGETS)
    monkeypatch.chdir(service)
    url = f"sqlite+aiosqlite:///{service / 'svc.sqlite3'}"
    monkeypatch.setenv("QX_DB__URL", url)
    runner = CliRunner()
    try:
        assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        made = runner.invoke(app, ["db", "revision", "--autogenerate", "-m", "initial"])
        assert made.exit_code == 0, made.output
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    finally:
        sys.modules.pop(module, None)

    def service_files() -> dict[Path, bytes]:
        return {
            path: path.read_bytes()
            for path in service.rglob("*")
            if path.is_file()
            and "__pycache__" not in path.parts
            and not path.name.startswith("svc.sqlite3")
        }

    before = service_files()

    # "pip install -U qx": a copy of the package whose chain gained qx_9001.
    release = tmp_path / "release"
    shutil.copytree(
        Path(qx.__file__).parent, release / "qx", ignore=shutil.ignore_patterns("__pycache__")
    )
    (release / "qx" / "migrations" / "versions" / "qx_9001_future.py").write_text(
        textwrap.dedent(
            '''
            """A later qx's schema change."""
            import sqlalchemy as sa
            from alembic import op

            revision = "qx_9001"
            down_revision = "qx_0010"
            branch_labels = None
            depends_on = None


            def upgrade() -> None:
                op.create_table("qx_future", sa.Column("id", sa.Integer(), primary_key=True))


            def downgrade() -> None:
                op.drop_table("qx_future")
            '''
        )
    )
    env = {**__import__("os").environ, "PYTHONPATH": f"{release}:{service}", "QX_DB__URL": url}

    def qx_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import sys, qx.cli; sys.argv[0] = 'qx'; qx.cli.main()", *args],
            capture_output=True,
            text=True,
            cwd=service,
            env=env,
            timeout=120,
            check=False,
        )

    where = qx_cli("db", "heads")
    assert where.returncode == 0 and "qx_9001" in where.stdout, where.stdout + where.stderr
    assert str(release) in qx_cli("db", "show", "qx_9001").stdout  # the new release's file
    upgraded = qx_cli("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "qx_future" in _sqlite_tables(service / "svc.sqlite3")
    now = qx_cli("db", "current")
    assert "qx_9001" in now.stdout, now.stdout + now.stderr
    assert service_files() == before


def test_newcomer_mistakes_with_migrations_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QX_DB__URL", raising=False)
    runner = CliRunner()
    # A module that does not exist, or an attribute that is not a MetaData: refused at init.
    missing = runner.invoke(app, ["db", "init", "--metadata", "nosuch.module:metadata"])
    assert missing.exit_code == 1 and "cannot import 'nosuch.module'" in missing.output
    assert len(missing.output.strip().splitlines()) == 1 and not (tmp_path / "alembic.ini").exists()
    module = _service(tmp_path, "metadata = 42\n")
    try:
        wrong = runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"])
        assert wrong.exit_code == 1 and "expected a sqlalchemy MetaData" in wrong.output
    finally:
        sys.modules.pop(module, None)
    # No QX_DB__URL: refused, and no ./qx.sqlite3 is created behind the user's back.
    module = _service(tmp_path, WIDGETS)
    try:
        assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
        for args in (
            ["db", "revision", "--autogenerate", "-m", "x"],
            ["db", "upgrade"],
            ["db", "check"],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == 1, result.output
            assert "no database to migrate: set QX_DB__URL" in result.output, result.output
            assert "Traceback" not in result.output
        assert not list(tmp_path.glob("*.sqlite3*"))
    finally:
        sys.modules.pop(module, None)


def test_db_check_and_autogenerate_leave_other_services_tables_alone(
    empty_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database shared with another service: its tables are neither drift nor dropped.
    module = _service(tmp_path, WIDGETS)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    try:
        assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        _execute("CREATE TABLE billing_invoices (id INTEGER PRIMARY KEY, total INTEGER)")
        made = runner.invoke(app, ["db", "revision", "--autogenerate", "-m", "initial"])
        assert made.exit_code == 0, made.output
        (revision,) = (tmp_path / "migrations" / "versions").glob("*_initial.py")
        assert "billing_invoices" not in revision.read_text()
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        checked = runner.invoke(app, ["db", "check"])
        assert checked.exit_code == 0 and "schema is current" in checked.output, checked.output
        assert runner.invoke(app, ["db", "downgrade", "base"]).exit_code == 0
    finally:
        sys.modules.pop(module, None)
        _execute("DROP TABLE billing_invoices")


@pytest.mark.postgres_only
def test_a_notify_trigger_left_on_the_outbox_is_checked_and_dropped_by_a_service_s_revision(
    empty_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # qx's chain leaves no trigger; qx db check reports one put back by hand (it would make
    # every writer's commit wait for a database-wide lock) and the service's next
    # autogenerated revision drops it.
    module = _service(tmp_path, WIDGETS)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
    try:
        upgraded = runner.invoke(app, ["db", "upgrade"])
        assert upgraded.exit_code == 0, upgraded.output
        clean = runner.invoke(app, ["db", "check"])
        assert clean.exit_code == 1 and "missing table widgets" in clean.output
        _execute(NOTIFY_FUNCTION_SQL)
        _execute(NOTIFY_TRIGGER_SQL.replace("{table}", "qx_outbox"))
        extra = runner.invoke(app, ["db", "check"])
        assert extra.exit_code == 1
        assert "extra NOTIFY trigger qx_outbox_notify on qx_outbox" in extra.output
        assert "database-wide lock" in extra.output
        command.revision(
            alembic_config("alembic.ini"),
            message="again",
            autogenerate=True,
            head="base",
            version_path=str(tmp_path / "migrations" / "versions"),
        )
        (again,) = (tmp_path / "migrations" / "versions").glob("*_again.py")
        written = again.read_text()
        assert "op.drop_outbox_notify('qx_outbox')" in written, written
        assert (
            "op.create_outbox_notify('qx_outbox')" in written and "import qx.migrations" in written
        )
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
        assert await current(empty, version_table_schema=schema) == QX_HEAD
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


def test_the_command_line_logs_json_lines_at_the_level_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `qx --log-level INFO --log-json <command>`: what Alembic and qx log, one JSON object per
    # line on stderr, even for a service whose alembic.ini has logging sections of its own.
    import json
    import logging

    module = _service(tmp_path, WIDGETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QX_DB__URL", f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    runner = CliRunner()
    try:
        assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
        result = runner.invoke(app, ["--log-level", "INFO", "--log-json", "db", "upgrade"])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        assert any("Running upgrade" in r["message"] and "qx_0001" in r["message"] for r in records)
        assert {r["level"] for r in records} <= {"INFO", "WARNING", "ERROR"}
        assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
        bad = runner.invoke(app, ["--log-level", "LOUD", "db", "current"])
        assert bad.exit_code == 2 and "not a level" in bad.output
    finally:
        sys.modules.pop(module, None)
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_a_database_qx_migrated_in_code_takes_the_service_s_chain_and_heads_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's `await qx.migrations.upgrade(engine)` first (qx's tables only), then the
    # service's own `qx db upgrade`: no "Can't locate revision", no example tables. Then two
    # heads of the service's own are refused by `qx db revision` until `qx db merge`.
    module = _service(tmp_path, WIDGETS)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}"
    monkeypatch.setenv("QX_DB__URL", url)

    async def qx_in_code() -> None:
        engine = create_engine(load_settings().db)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(qx_in_code())
    assert not (ORDERS_TABLES & _sqlite_tables(tmp_path / "svc.sqlite3"))
    runner = CliRunner()
    versions = tmp_path / "migrations" / "versions"
    try:
        assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
        made = runner.invoke(app, ["db", "revision", "--autogenerate", "-m", "initial"])
        assert made.exit_code == 0, made.output
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        assert "widgets" in _sqlite_tables(tmp_path / "svc.sqlite3")
        (first,) = versions.glob("*_initial.py")
        base = first.name.split("_")[1]
        # Two developers branch from the same revision.
        for message in ("left", "right"):
            command.revision(alembic_config("alembic.ini"), message=message, head=base, splice=True)
        refused = runner.invoke(app, ["db", "revision", "-m", "third"])
        assert refused.exit_code == 1 and "qx db merge" in refused.output, refused.output
        tips = [path.name.split("_")[1] for path in sorted(versions.glob("*_left.py"))]
        tips += [path.name.split("_")[1] for path in sorted(versions.glob("*_right.py"))]
        merged = runner.invoke(app, ["db", "merge", *tips, "-m", "join"])
        assert merged.exit_code == 0, merged.output
        assert runner.invoke(app, ["db", "revision", "-m", "third"]).exit_code == 0
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        assert runner.invoke(app, ["db", "check"]).exit_code == 0
    finally:
        sys.modules.pop(module, None)


def test_plain_alembic_revision_writes_into_the_service_never_into_qx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Most users run Alembic's own command. In a `qx db init` project it must do what
    # `qx db revision` does: the service's folder, on the service's head, on top of qx's.
    module = _service(tmp_path, WIDGETS)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}"
    monkeypatch.setenv("QX_DB__URL", url)
    runner = CliRunner()
    assert runner.invoke(app, ["db", "init", "--metadata", f"{module}:metadata"]).exit_code == 0
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    qx_dir = qx_versions()
    shipped = sorted(p.name for p in qx_dir.iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}

    def alembic(*args: str, database: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            cwd=tmp_path,
            env={**env, "QX_DB__URL": url} if database else env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    versions = tmp_path / "migrations" / "versions"
    made = alembic("revision", "--autogenerate", "-m", "initial")
    assert made.returncode == 0, made.stderr
    written = list(versions.glob("*_initial.py"))
    assert len(written) == 1, (made.stdout, made.stderr, list(qx_dir.glob("*initial*")))
    (first,) = written
    text_ = first.read_text()
    assert "widgets" in text_ and f"depends_on: str | Sequence[str] | None = '{QX_HEAD}'" in text_
    # No database needed for a revision written by hand; it goes on the service's head.
    second = alembic("revision", "-m", "second", database=False)
    assert second.returncode == 0, second.stderr
    (follow,) = versions.glob("*_second.py")
    rev_id = first.name.split("_")[1]
    assert f"down_revision: str | Sequence[str] | None = '{rev_id}'" in follow.read_text()
    assert sorted(p.name for p in qx_dir.iterdir()) == shipped  # the package is untouched
    heads = alembic("heads")
    assert heads.returncode == 0 and QX_HEAD in heads.stdout
    assert follow.name.split("_")[1] in heads.stdout


@pytest.mark.timeout(300)
def test_plain_alembic_in_a_fresh_environment_with_qx_from_its_wheel(tmp_path: Path) -> None:
    # As a user installs it: qx from its wheel in a new virtual environment (its
    # dependencies from the development one), `qx db init`, then Alembic's own commands.
    root = Path(__file__).resolve().parents[2]
    wheels = tmp_path / "wheels"
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=240)
    built = run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheels)],
        cwd=root,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("qx-*.whl")
    fresh = tmp_path / "fresh"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(fresh)]).returncode == 0
    python = fresh / "bin" / "python"
    installed = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)]
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    site = Path(
        run([str(python), "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip()
    )
    deps = Path(sysconfig.get_paths()["purelib"])
    (site / "zz_dependencies.pth").write_text(f"{deps}\n")  # after the wheel's own qx
    package = Path(
        run(
            [str(python), "-c", "import qx, os; print(os.path.dirname(qx.__file__))"]
        ).stdout.strip()
    )
    assert package.is_relative_to(site), package  # qx from the wheel, not the checkout
    shipped = sorted(p.name for p in (package / "migrations" / "versions").iterdir())

    service = tmp_path / "service"
    service.mkdir()
    module = _service(service, WIDGETS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QX_", "PYTHON"))}
    env["QX_DB__URL"] = f"sqlite+aiosqlite:///{service / 'svc.sqlite3'}"

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return run([str(python), *args], cwd=service, env=env)

    qx = str(fresh / "bin" / "qx")  # the wheel's console script
    init = run([qx, "db", "init", "--metadata", f"{module}:metadata"], cwd=service, env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    for args in (
        ("-m", "alembic", "upgrade", "heads"),
        ("-m", "alembic", "revision", "--autogenerate", "-m", "x"),
        ("-m", "alembic", "upgrade", "heads"),
    ):
        done = command(*args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    (revision,) = (service / "migrations" / "versions").glob("*_x.py")
    written = revision.read_text()
    assert (
        "widgets" in written and f"depends_on: str | Sequence[str] | None = '{QX_HEAD}'" in written
    )
    assert sorted(p.name for p in (package / "migrations" / "versions").iterdir()) == shipped
    assert "widgets" in _sqlite_tables(service / "svc.sqlite3")
