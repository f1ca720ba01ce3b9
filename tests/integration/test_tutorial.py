"""The documentation's tutorial runs as written: its files, written to disk from the page's
code blocks, run in one process; then its production part (``qx outbox relay`` and ``qx inbox
run``, as the page gives them) carries an account's event through NATS JetStream."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qx.core import new_id
from tests.integration.helpers import drop_stream
from tests.services import NATS, resolve

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "getting-started.md"


def _files(page: str) -> dict[str, str]:
    """Each ``python title="path"`` block of the page, by its path."""
    blocks = re.findall(r'```python title="([^"]+)"\n(.*?)```', page, re.S)
    return dict(blocks)


@pytest.fixture
def tutorial(tmp_path: Path) -> Path:
    files = _files(PAGE.read_text(encoding="utf-8"))
    assert set(files) == {
        "bank/domain.py",
        "bank/db.py",
        "bank/app.py",
        "mail/db.py",
        "mail/consumers.py",
        "run.py",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}
    env.update(extra)
    return env


def test_the_tutorial_runs_as_written(tutorial: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "run.py"],
        cwd=tutorial,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bank: opened ") and lines[0].endswith(" balance 100")
    # The page shows the same output.
    shown = PAGE.read_text(encoding="utf-8").split("$ python run.py\n", 1)[1].split("```")[0]
    assert lines[1:] == shown.splitlines()[1:]
    with sqlite3.connect(tutorial / "mail.sqlite3") as db:
        assert db.execute('SELECT "to" FROM welcome_mails').fetchall() == [("ada@example.com",)]
        assert db.execute("SELECT count(*) FROM qx_inbox").fetchone() == (1,)
    with sqlite3.connect(tutorial / "bank.sqlite3") as db:
        published = db.execute("SELECT count(*) FROM qx_outbox WHERE published_at IS NOT NULL")
        assert published.fetchone() == (1,)


def _commands(page: str) -> dict[str, list[str]]:
    """The page's production commands, by their first word after the variables."""
    block = page.split("## 7.", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    found: dict[str, list[str]] = {}
    for command in block.replace("\\\n", " ").splitlines():
        if command.startswith("#") or not command.strip():
            continue
        words = command.split()
        env = [w for w in words if re.fullmatch(r"QX_\w+=\S+", w)]
        rest = words[len(env) :]
        found[" ".join(rest[:3])] = env + rest
    return found


@pytest.fixture
def stream() -> Iterator[tuple[str, str]]:
    url = resolve(NATS)
    name = f"QXTUT{new_id().hex[-8:].upper()}"
    yield url, name
    asyncio.run(drop_stream(url, name))


@pytest.mark.timeout(120)
def test_the_tutorials_services_run_apart_through_nats(
    tutorial: Path, stream: tuple[str, str]
) -> None:
    url, name = stream
    subprocess.run(
        [sys.executable, "run.py"], cwd=tutorial, capture_output=True, timeout=120, check=True
    )
    commands = _commands(PAGE.read_text(encoding="utf-8"))
    assert set(commands) == {"qx outbox relay", "qx inbox run"}
    qx = str(Path(sys.executable).with_name("qx"))
    started: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def said() -> str:
        return "\n".join(log.read_text(errors="replace")[-2000:] for log in logs)

    try:
        for key in ("qx inbox run", "qx outbox relay"):
            words = commands[key]
            env = dict(w.split("=", 1) for w in words if "=" in w and w.startswith("QX_"))
            argv = [qx, *[w for w in words if not w.startswith("QX_")][1:]]
            env["QX_BROKER__URL"] = url  # the page's server, or the one the tests were given
            env["QX_BROKER__STREAM"] = name
            env["QX_BROKER__SUBJECT_PREFIX"] = name.lower()
            env["PYTHONPATH"] = str(tutorial)
            logs.append(tutorial / f"{argv[2]}.log")
            with logs[-1].open("wb") as log:
                started.append(
                    subprocess.Popen(
                        argv, cwd=tutorial, env=_env(**env), stdout=log, stderr=subprocess.STDOUT
                    )
                )
        # A second account, opened while both run; run.py's first was published in-process.
        opener = (
            "import asyncio\n"
            "from bank.app import OpenAccount, bus, connect\n"
            "async def main():\n"
            "    engine = connect('sqlite+aiosqlite:///bank.sqlite3')\n"
            "    await bus.execute(OpenAccount(owner='grace', email='grace@example.com'))\n"
            "    await engine.dispose()\n"
            "asyncio.run(main())\n"
        )
        subprocess.run(
            [sys.executable, "-c", opener], cwd=tutorial, timeout=60, check=True, env=_env()
        )
        deadline = time.monotonic() + 60
        while True:
            with sqlite3.connect(tutorial / "mail.sqlite3") as db:
                rows = db.execute('SELECT "to" FROM welcome_mails ORDER BY "to"').fetchall()
            if len(rows) == 2:
                break
            assert all(p.poll() is None for p in started), said()
            assert time.monotonic() < deadline, f"the consumer applied {rows}\n{said()}"
            time.sleep(0.1)
        assert rows == [("ada@example.com",), ("grace@example.com",)]
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in started]
        assert codes == [0] * len(started), said()
