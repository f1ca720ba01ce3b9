"""``qx outbox status | requeue | purge`` on a SQLite file."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from qx.cli import app
from qx.core import utcnow
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.outbox import OutboxRelay, outbox_table
from qx.settings import DatabaseSettings, RelaySettings
from qx.testing import MemoryPublisher
from tests import models
from tests.integration.conftest import create_tables


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.sqlite3'}"
    monkeypatch.setenv("QX_DB__URL", url)

    async def prepare() -> None:
        engine = create_engine(DatabaseSettings(url=url))
        try:
            await create_tables(engine)
            factory = UnitOfWorkFactory(models.AppUnitOfWork, create_session_factory(engine))
            async with factory() as uow:
                counter = models.Counter(name="cli")
                await uow.counters.add(counter)
                await uow.commit()
            for _ in range(3):
                async with factory() as uow:
                    (await uow.counters.require(counter.id)).increment(integration=True)
                    await uow.commit()
            failing = MemoryPublisher()
            failing.fail_with = "down"
            past = RelaySettings(max_attempts=1, publish_past=frozenset({"tests.counter_changed"}))
            first = OutboxRelay(engine, failing, settings=past)
            await first.run_once()
            await first.release()
            # Its event may be published past: the dead head parks nothing.
            await OutboxRelay(engine, MemoryPublisher()).run_once()
            async with engine.begin() as conn:
                await conn.execute(
                    update(outbox_table)
                    .where(outbox_table.c.published_at.is_not(None))
                    .values(published_at=utcnow() - timedelta(days=2))
                )
        finally:
            await engine.dispose()

    asyncio.run(prepare())
    return url


def test_status_requeue_purge(database: str) -> None:
    runner = CliRunner()
    status = runner.invoke(app, ["outbox", "status"])
    assert status.exit_code == 0, status.output
    assert "qx_outbox" in status.output
    assert "dead and parked rows" in status.output and "down" in status.output
    as_json = runner.invoke(app, ["outbox", "status", "--json"])
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    counts = document["status"]
    assert (counts["pending"], counts["in_retry"], counts["dead"], counts["parked"]) == (0, 0, 1, 0)
    (dead,) = document["rows"]
    assert (dead["state"], dead["attempts"], dead["last_error"]) == ("dead", 1, "down")
    assert dead["event_name"] == "tests.counter_changed" and dead["aggregate"].startswith(
        "Counter/"
    )

    requeued = runner.invoke(app, ["outbox", "requeue", "--event", "tests.counter_changed"])
    assert requeued.exit_code == 0 and "requeued 1 dead row(s)" in requeued.output
    assert runner.invoke(app, ["outbox", "requeue"]).output.startswith("requeued 0")

    assert "purged 0" in runner.invoke(app, ["outbox", "purge", "--older-than", "7d"]).output
    assert "purged 2" in runner.invoke(app, ["outbox", "purge", "--older-than", "1d"]).output

    bad = runner.invoke(app, ["outbox", "purge", "--older-than", "soon"])
    assert bad.exit_code == 2 and "expected a number and a unit" in bad.output
    assert runner.invoke(app, ["outbox", "requeue", "nope"]).exit_code == 2


def test_unreachable_database_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QX_DB__URL", "postgresql+asyncpg://postgres@127.0.0.1:1/none")
    result = CliRunner().invoke(app, ["outbox", "status"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output or "error:" in result.output
    assert "Traceback" not in result.output
