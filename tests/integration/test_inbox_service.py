"""``qx inbox run`` as a real process: it consumes a NATS stream into the service's inbox
with two subscribers, applies every event once, and stops on SIGTERM within a bound."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id, request_context
from qx.db import UnitOfWorkFactory
from qx.outbox.publishers import publisher_from_settings
from qx.settings import BrokerSettings
from tests import models
from tests.integration.helpers import drop_stream
from tests.integration.test_inbox import envelope_for, new_counter, value_of
from tests.integration.test_relay_crash import current_schema
from tests.services import NATS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]
ROOT = Path(__file__).resolve().parents[2]

CONSUMERS = """
    from qx.outbox import EventRouter

    router = EventRouter()


    @router.on("tests.counter_changed")
    async def apply(envelope, uow):
        counter = await uow.counters.require(envelope.data["counter_id"])
        counter.increment()
    """


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.mark.timeout(120)
async def test_qx_inbox_run_consumes_once_and_stops_on_sigterm(
    engine: AsyncEngine, uow_factory: Factory, tmp_path: Path
) -> None:
    url = resolve(NATS)
    tag = new_id().hex[-10:]
    broker = BrokerSettings(url=url, subject_prefix=f"qxs{tag}", stream=f"QXS{tag}")
    module = f"svc_consumers_{tag}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(CONSUMERS))
    publisher = publisher_from_settings(broker)
    await publisher.connect()  # the stream exists before the service subscribes
    ident = await new_counter(uow_factory)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
        QX_DB__URL=engine.url.render_as_string(hide_password=False),
        QX_DB__SEARCH_PATH=await current_schema(engine),
        QX_BROKER__URL=url,
        QX_BROKER__SUBJECT_PREFIX=broker.subject_prefix,
        QX_BROKER__STREAM=broker.stream,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from qx.cli import main; main()",
        "inbox", "run", "--router", f"{module}:router", "--uow", "tests.models:AppUnitOfWork",
        "--consumer", f"svc{tag}", "--concurrency", "2",
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert b"consuming" in line, line
        for _ in range(20):
            await publisher.publish(envelope_for(ident))
        deadline = time.monotonic() + 60
        while True:
            with request_context(tenant_id="t-1"):
                done = await value_of(uow_factory, ident)
            if done >= 20 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert done == 20
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.wait_for(process.wait(), 30)
        assert code == 0, (await process.stderr.read()).decode()[-2000:] if process.stderr else ""
        assert time.monotonic() - started < 10
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await publisher.close()
        await drop_stream(url, broker.stream)
    with request_context(tenant_id="t-1"):
        assert await value_of(uow_factory, ident) == 20  # once each, with two subscribers


def test_qx_inbox_run_names_what_is_wrong_in_one_line() -> None:
    from typer.testing import CliRunner

    from qx.cli import app

    runner = CliRunner()
    bad = runner.invoke(
        app, ["inbox", "run", "--router", "no-colon", "--uow", "x:y", "--consumer", "c"]
    )
    assert bad.exit_code == 1 and "router must look like" in bad.output
    missing = runner.invoke(
        app, ["inbox", "run", "--router", "tests.models:nothing", "--uow", "x:y", "--consumer", "c"]
    )
    assert missing.exit_code == 1 and "expected an EventRouter" in missing.output
    wrong = runner.invoke(
        app,
        ["inbox", "run", "--router", "tests.integration.test_inbox_service:ROOT",
         "--uow", "tests.models:AppUnitOfWork", "--consumer", "c"],
    )  # fmt: skip
    assert wrong.exit_code == 1 and "expected an EventRouter" in wrong.output
    zero = runner.invoke(
        app,
        [
            "inbox",
            "run",
            "--router",
            "a:b",
            "--uow",
            "x:y",
            "--consumer",
            "c",
            "--concurrency",
            "0",
        ],
    )
    assert zero.exit_code == 2  # typer refuses it before anything runs
