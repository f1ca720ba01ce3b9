"""Two services end to end, every part a process of its own, faults on the way.

Service A: two writer processes send 2,000 commands through qx's bus, each incrementing one
of 12 counters (the integration event goes to the outbox in the same commit); one command
in ten fails after recording its event, so nothing of it may leave. Two ``qx outbox relay``
processes publish to NATS JetStream through a TCP proxy. Service B: three ``qx inbox run``
processes consume through the same proxy into a database of their own, sharing the stream's
six partitions (``QX_BROKER__PARTITIONS``); the handler only writes down what it applies and
where (no ordering guard of its own). Meanwhile a relay and a consumer
are killed with SIGKILL and the broker is cut for 4 s. After the drain: every committed
event applied once, none of a failed command, every counter's events applied in commit
order, each counter's by one consumer at a time (it moves only when partitions are shared
anew: consumers joining, one dying), nothing left pending.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import new_id
from qx.db import UnitOfWorkFactory
from qx.outbox import outbox_table
from tests import models
from tests.integration.conftest import drop_schema, engine_with_tables, pg_url_for
from tests.integration.helpers import drop_stream
from tests.integration.proxy import Proxy
from tests.integration.test_relay_crash import current_schema
from tests.services import NATS, resolve

Factory = UnitOfWorkFactory[models.AppUnitOfWork]
ROOT = Path(__file__).resolve().parents[2]
COUNTERS = 12
EACH_WRITER = 1000

WRITER = """
    import asyncio, random, sys
    from dataclasses import dataclass
    from uuid import UUID
    from qx.cqrs import Command, MessageBus
    from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
    from qx.errors import ConcurrencyConflict, TransientError
    from qx.settings import load_settings
    from tests import models


    @dataclass(frozen=True, kw_only=True)
    class Bump(Command[int]):
        counter_id: UUID
        refuse: bool = False


    class Refused(Exception):
        pass


    async def main(ids, count, seed):
        engine = create_engine(load_settings().db)
        bus = MessageBus()
        bus.provide(
            uow_factory=UnitOfWorkFactory(
                models.AppUnitOfWork, create_session_factory(engine), dispatcher=bus
            )
        )

        @bus.handler(Bump)
        async def bump(command, uow):
            counter = await uow.counters.require(command.counter_id)
            counter.increment(integration=True)
            if command.refuse:  # fails after recording its event: nothing may leave
                raise Refused(str(command.counter_id))
            return counter.value

        picks = random.Random(seed)
        done = refused = 0
        while done < count:
            command = Bump(counter_id=picks.choice(ids), refuse=picks.random() < 0.1)
            try:
                await bus.execute(command)
                done += 1
            except Refused:
                refused += 1
            except (ConcurrencyConflict, TransientError):
                await asyncio.sleep(0.001)  # the bus gave up on a busy counter: again
        print("refused", refused, flush=True)
        await engine.dispose()

    ids = [UUID(i) for i in sys.argv[1].split(",")]
    asyncio.run(main(ids, int(sys.argv[2]), int(sys.argv[3])))
    """

CONSUMER = """
    import os
    from sqlalchemy import text
    from qx.outbox import EventRouter

    router = EventRouter()


    @router.on("tests.counter_changed")
    async def apply(envelope, uow):
        await uow.session.execute(
            text("INSERT INTO applied (counter_id, value, pid) VALUES (:c, :v, :p)"),
            {"c": envelope.data["counter_id"], "v": envelope.data["value"], "p": os.getpid()},
        )
    """


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def service_b(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine, schema = await engine_with_tables("postgresql", tmp_path, models.metadata)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TABLE applied (n BIGSERIAL PRIMARY KEY, counter_id TEXT NOT NULL,"
                " value INT NOT NULL, pid INT NOT NULL)"
            )
        )
    try:
        yield engine
    finally:
        await engine.dispose()
        if schema is not None:
            await drop_schema(schema)


async def _start(args: list[str], env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def _ready(process: asyncio.subprocess.Process, word: bytes) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    assert word in line, line


@pytest.mark.timeout(300)
async def test_writers_relays_and_consumers_lose_duplicate_and_reorder_nothing(
    engine: AsyncEngine, uow_factory: Factory, service_b: AsyncEngine, tmp_path: Path
) -> None:
    import nats

    url = resolve(NATS)
    tag = new_id().hex[-10:]
    prefix, stream, name = f"qxe{tag}", f"QXE{tag}", f"svcb{tag}"
    target = urlsplit(url)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 4222)
    await proxy.start()
    via_proxy = f"nats://127.0.0.1:{proxy.port}"
    (tmp_path / f"consumers_{tag}.py").write_text(textwrap.dedent(CONSUMER))
    (tmp_path / "writer.py").write_text(textwrap.dedent(WRITER))
    async with uow_factory() as uow:
        made = [models.Counter(name=f"e{i}") for i in range(COUNTERS)]
        await uow.counters.add_many(made)
        await uow.commit()
    ids = ",".join(str(c.id) for c in made)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"], duplicate_window=120)
    base = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}
    base.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
        QX_BROKER__URL=via_proxy,
        QX_BROKER__SUBJECT_PREFIX=prefix,
        QX_BROKER__STREAM=stream,
        QX_BROKER__CREATE_STREAM="false",
        QX_BROKER__HEARTBEAT="1",
        QX_BROKER__PARTITIONS="6",
    )
    side_a = {
        **base,
        "QX_DB__URL": pg_url_for(engine),
        "QX_DB__SEARCH_PATH": await current_schema(engine),
        "QX_RELAY__LEASE_SECONDS": "2",
        "QX_RELAY__POLL_INTERVAL": "0.5",
        "QX_RELAY__RECONNECT_DELAY": "0.2",
        "QX_RELAY__DB_TIMEOUT": "3",
    }
    side_b = {
        **base,
        "QX_DB__URL": pg_url_for(service_b),
        "QX_DB__SEARCH_PATH": await current_schema(service_b),
    }
    relay = ["-c", "from qx.cli import main; main()", "outbox", "relay"]
    consumer = [
        "-c", "from qx.cli import main; main()", "inbox", "run",
        "--router", f"consumers_{tag}:router", "--uow", "tests.models:AppUnitOfWork",
        "--consumer", name, "--lease-seconds", "2",
    ]  # fmt: skip
    processes: list[asyncio.subprocess.Process] = []
    try:
        relays = [await _start(relay, side_a, tmp_path) for _ in range(2)]
        consumers = [await _start(consumer, side_b, tmp_path) for _ in range(3)]
        processes += relays + consumers
        for process in relays:
            await _ready(process, b"relaying")
        for process in consumers:
            await _ready(process, b"consuming")
        writers = [
            await _start(["writer.py", ids, str(EACH_WRITER), str(seed)], side_a, tmp_path)
            for seed in (1, 2)
        ]
        processes += writers

        async def applied() -> int:
            async with service_b.connect() as conn:
                return int(await conn.scalar(text("SELECT count(*) FROM applied")) or 0)

        async def reached(count: int) -> None:
            deadline = time.monotonic() + 120
            while await applied() < count:
                assert time.monotonic() < deadline, f"{await applied()} of {count} applied"
                await asyncio.sleep(0.1)

        await reached(100)
        relays[0].send_signal(signal.SIGKILL)
        consumers[0].send_signal(signal.SIGKILL)
        await reached(250)
        await proxy.stop()  # the broker is gone for relays and consumers alike
        await asyncio.sleep(4)  # the outage's length is this test's input
        await proxy.start()
        refused = 0
        for writer in writers:
            assert await asyncio.wait_for(writer.wait(), 180) == 0
            assert writer.stdout is not None
            refused += int((await writer.stdout.read()).split()[-1])
        assert refused > 0  # failed commands were among them
        total = 2 * EACH_WRITER
        await reached(total)
        await asyncio.sleep(1)  # a duplicate, if any, would land now
        for process in (relays[1], *consumers[1:]):
            process.send_signal(signal.SIGTERM)
        for process in (relays[1], *consumers[1:]):
            assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await proxy.stop()
        await drop_stream(url, stream)
        await nc.close()
    async with service_b.connect() as conn:
        rows = (
            await conn.execute(text("SELECT counter_id, value, pid FROM applied ORDER BY n"))
        ).all()
    by_counter: dict[str, list[int]] = {}
    appliers: dict[str, list[int]] = {}
    for counter_id, value, pid in rows:
        by_counter.setdefault(counter_id, []).append(value)
        appliers.setdefault(counter_id, []).append(pid)
    async with uow_factory() as uow:
        finals = {str(c.id): (await uow.counters.require(c.id)).value for c in made}
    assert sum(finals.values()) == 2 * EACH_WRITER
    # Every committed event applied once, each counter's in commit order.
    assert {k: v for k, v in by_counter.items() if v != list(range(1, finals[k] + 1))} == {}
    assert {k: len(v) for k, v in by_counter.items()} == {k: v for k, v in finals.items() if v}
    # One consumer at a time per counter: its events change hands only when the partitions
    # are shared anew (the second and third consumer joining, the first one dying), never
    # back and forth between consumers reading at once (without partitions: hundreds).
    handovers = {k: sum(a != b for a, b in itertools.pairwise(v)) for k, v in appliers.items()}
    print("handovers", handovers)
    assert max(handovers.values()) <= 3, handovers
    assert len({pid for pids in appliers.values() for pid in pids}) >= 2  # the work was shared
    async with engine.connect() as conn:
        stuck = await conn.scalar(select(func.count()).where(outbox_table.c.published_at.is_(None)))
    assert stuck == 0
