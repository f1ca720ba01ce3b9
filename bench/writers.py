"""Benchmark: many writer processes committing orders at once, and what their sessions wait on.

``--processes`` processes x ``--tasks`` tasks place orders (1 order + 3 lines + 1 outbox
row) for ``--seconds`` through qx's unit of work, then the same through a hand-written
SQLAlchemy ORM writing the same rows (``place_order.py``'s), alternating ``--rounds``
times. Meanwhile ``pg_stat_activity`` is sampled every 100 ms: the share of the writers'
active samples waiting on ``Lock:object`` (the database-wide lock a COMMIT takes to queue a
NOTIFY) must stay <= 2%, and qx's commits/s >= 0.95x the hand-written ORM's.

    python bench/writers.py [--url ...] [--processes 4] [--tasks 16] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial

import sqlalchemy
from common import add_url_argument, bench_schema, save_table, versions
from place_order import place_with_orm, place_with_qx
from sqlalchemy import text

from qx.db import UnitOfWorkFactory, create_engine, create_session_factory
from qx.examples.orders.infrastructure import OrdersUnitOfWork
from qx.settings import DatabaseSettings

APPLICATION = "qx-bench-writer"


def worker() -> None:
    """``writers.py --worker KIND URL SCHEMA TASKS SECONDS``: one writer process; prints
    the commits it made."""
    kind, url, schema, tasks, seconds = sys.argv[sys.argv.index("--worker") + 1 :][:5]

    async def work() -> int:
        settings = DatabaseSettings(url=url, pool_size=int(tasks), max_overflow=0)
        server = {"search_path": schema, "application_name": APPLICATION}
        engine = create_engine(settings, connect_args={"server_settings": server})
        qx_factory = UnitOfWorkFactory(OrdersUnitOfWork, create_session_factory(engine))
        plain = sqlalchemy.ext.asyncio.async_sessionmaker(engine, expire_on_commit=False)

        one: Callable[[int], Awaitable[None]] = (
            partial(place_with_qx, qx_factory) if kind == "qx" else partial(place_with_orm, plain)
        )
        for n in range(int(tasks)):  # connections and statement caches
            await one(n)
        print("ready", flush=True)
        assert sys.stdin.readline().strip() == "go"
        deadline = time.perf_counter() + float(seconds)
        done = 0

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await one(done)
                done += 1

        await asyncio.gather(*(loop() for _ in range(int(tasks))))
        await engine.dispose()
        return done

    print(asyncio.run(work()), flush=True)


async def run_kind(db: object, args: argparse.Namespace, kind: str) -> tuple[float, Counter[str]]:
    """Commits/s of ``kind`` (``qx`` or ``orm``) and the wait events of its sessions."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        db.url,  # type: ignore[attr-defined]
        db.schema,  # type: ignore[attr-defined]
        str(args.tasks),
        str(args.seconds),
    ]
    processes = [
        await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(args.processes)
    ]
    for process in processes:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        assert line.strip() == b"ready", line
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
    started = time.perf_counter()
    waits: Counter[str] = Counter()
    engine = db.engine  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        while time.perf_counter() < started + args.seconds - 0.2:
            sampled = await conn.execute(
                text(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU')"
                    " FROM pg_stat_activity WHERE application_name = :app AND state = 'active'"
                ),
                {"app": APPLICATION},
            )
            # Active sessions only: a share of the time the server spends on the writers.
            waits.update(str(w) for (w,) in sampled)
            await conn.commit()
            await asyncio.sleep(0.1)
    commits = 0
    for process in processes:
        out, _ = await process.communicate()
        commits += int(out.decode().split()[-1])
    return commits / args.seconds, waits


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    best: dict[str, float] = {}
    waits: dict[str, Counter[str]] = {"qx": Counter(), "orm": Counter()}
    async with bench_schema(args.url) as db:
        for round_number in range(args.rounds):
            kinds = ("qx", "orm") if round_number % 2 == 0 else ("orm", "qx")
            for kind in kinds:
                rate, sampled = await run_kind(db, args, kind)
                best[kind] = max(best.get(kind, 0.0), rate)
                waits[kind] += sampled
    print(
        f"writers: {args.processes} processes x {args.tasks} tasks for {args.seconds:.0f}s, "
        f"best of {args.rounds}; {versions()}"
    )
    table: list[list[object]] = []
    for kind, name in (("qx", "qx"), ("orm", "hand-written ORM")):
        total = sum(waits[kind].values()) or 1
        locked = waits[kind]["Lock:object"] / total
        top = ", ".join(f"{w} {c / total:.0%}" for w, c in waits[kind].most_common(5))
        ratio = best[kind] / best["orm"]
        print(f"{name:<18}{best[kind]:>8.0f} commits/s {ratio:>6.2f}x  Lock:object {locked:.1%}")
        print(f"{'':<18}sessions: {top}")
        table.append([name, f"{best[kind]:.0f}", f"{ratio:.2f}x", f"{locked:.1%}", top])
    save_table(
        args.json,
        f"Writers: {args.processes} processes x {args.tasks} tasks placing orders for "
        f"{args.seconds:.0f}s (pg_stat_activity sampled every 100 ms; {os.cpu_count()} CPUs)",
        ["implementation", "commits/s", "vs ORM", "Lock:object", "active sessions (top waits)"],
        table,
    )
    if args.json is None:
        print(json.dumps({k: round(v) for k, v in best.items()}))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        asyncio.run(main())
