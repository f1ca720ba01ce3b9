"""The README quickstart runs as written; `qx demo` runs on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qx._demo import run_demo
from qx.settings import DatabaseSettings, QxSettings
from tests.integration.conftest import drop_schema, make_backend_engine, pg_url_for

ROOT = Path(__file__).resolve().parents[2]


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = tmp_path / "quickstart.py"
    script.write_text(code.group(1))
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "handled inside the transaction: AccountOpened" in result.stdout
    assert "('bank.account_opened', 'acme', 'req-1')" in result.stdout


@pytest.mark.skip_on(
    "memory",
    reason="the demo migrates a database of its own; the kit makes its tables from the metadata",
)
async def test_demo_runs(backend: str, tmp_path: Path) -> None:
    engine, schema = await make_backend_engine(backend, tmp_path)
    try:
        settings = QxSettings(db=DatabaseSettings(url=str(engine.url.render_as_string(False))))
        report = await run_demo(settings, orders_count=4, engine=engine)
    finally:
        await engine.dispose()
        if schema:
            await drop_schema(schema)
    assert report.orders_placed == 4
    assert report.orders_by_status == {"placed": 1, "shipped": 2, "cancelled": 1}
    assert report.events_dispatched == {"OrderPlaced": 4, "OrderShipped": 2, "OrderCancelled": 1}
    assert report.outbox_total == 6 and report.published == 6
    assert [r["event_name"] for r in report.outbox_rows][-1] == "orders.order_shipped"
    # Eight commands raced on one paid order: one ship succeeds, the rest break a rule.
    assert report.race_outcomes == {
        "ShipOrder: done": 1,
        "ShipOrder: refused by the domain": 3,
        "PayOrder: refused by the domain": 4,
    }


@pytest.mark.postgres_only
async def test_demo_on_postgresql_publishes_to_jetstream(backend: str, tmp_path: Path) -> None:
    import nats

    from qx.core import new_id
    from qx.settings import BrokerSettings
    from tests.services import NATS, resolve

    url = resolve(NATS)
    tag = new_id().hex[-10:]
    broker = BrokerSettings(url=url, subject_prefix=f"qxd{tag}", stream=f"QXD{tag}")
    engine, schema = await make_backend_engine(backend, tmp_path)
    try:
        settings = QxSettings(db=DatabaseSettings(url=pg_url_for(engine)), broker=broker)
        report = await run_demo(settings, orders_count=40, engine=engine)
    finally:
        await engine.dispose()
        if schema:
            await drop_schema(schema)
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(broker.stream)
        await nc.jetstream().delete_stream(broker.stream)
    finally:
        await nc.close()
    assert report.published == report.outbox_total == 40 + 2
    assert info.state.messages == report.published


@pytest.mark.postgres_only
@pytest.mark.parametrize("concurrency", [32, 256])
async def test_demo_on_postgresql_succeeds_at_high_concurrency(
    backend: str, tmp_path: Path, concurrency: int
) -> None:
    # Every order reserves stock of one of a few products: the hot rows are read locked, so
    # concurrent orders queue for them instead of exhausting the bus's retries.
    engine, schema = await make_backend_engine(backend, tmp_path)
    try:
        settings = QxSettings(db=DatabaseSettings(url=pg_url_for(engine)))
        report = await run_demo(settings, orders_count=120, engine=engine, concurrency=concurrency)
    finally:
        await engine.dispose()
        if schema:
            await drop_schema(schema)
    assert report.orders_placed == 120
    assert report.published == report.outbox_total == 120 + 2


def test_qx_demo_command(tmp_path: Path) -> None:
    qx = Path(sys.executable).with_name("qx")
    result = subprocess.run(
        [str(qx), "demo", "--orders", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "QX_DB__URL": "sqlite:///demo.db"},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "placed 3 orders" in result.stdout
    assert (tmp_path / "demo.db").exists()
    bad = subprocess.run(
        [str(qx), "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "QX_DB__URL": "mysql://x/y"},
    )
    assert bad.returncode == 1
    assert "unsupported database 'mysql'" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr


def test_qx_demo_serve_answers_http(tmp_path: Path) -> None:
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    qx = Path(sys.executable).with_name("qx")
    server = subprocess.Popen(
        [str(qx), "demo", "--serve", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/orders", headers={"X-Tenant-ID": "demo"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    assert response.status == 200
                    assert b'"items"' in response.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "qx demo --serve did not answer"
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_examples_entry_point_builds_the_app() -> None:
    from examples.orders.main import app

    assert {route.path for route in app.routes} >= {"/orders", "/orders/{order_id}"}
