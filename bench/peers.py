"""Benchmark: qx beside the ORMs people compare it with, per row, on the same operations.

The operations of the public tortoise/orm-benchmarks harness: insert one row per
transaction; insert a batch one object at a time in one transaction; bulk insert; get by
primary key; filter with a large result (every row) and with a small one (one row per
query, on a non-key column); update every field or some fields and delete, each as a loop of
load-by-key then change, one commit at the end. Each library is written as its own
documentation shows, on its own copy of a small ``journal`` table in one fresh PostgreSQL
schema, in one process and one run; rounds alternate between libraries and the best round
of each is kept (a round sums several steps, each on fresh rows; a read step repeats its
operation over its rows until it has lasted 50 ms). Reported: client CPU per
row (``time.process_time``, what the Python process spends; the server's work is not in it)
and wall time per row, with the ratios of CPU to SQLAlchemy ORM's and to Tortoise's. Each
step checks what the database holds afterwards (rows inserted, changed or gone; rows read).

    python bench/peers.py [--url postgresql+asyncpg://postgres@127.0.0.1:5432/test]
                          [--rows 300] [--rounds 3] [--repeat 3]

Tortoise ORM and Piccolo are in the ``bench`` dependency group (``make bench`` installs it);
a library that is not installed is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from common import BenchDatabase, add_url_argument, bench_schema, save_table, versions
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import registry as sa_registry

from qx.core import AggregateRoot
from qx.db import (
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
)

TABLES = ("journal_qx", "journal_orm", "journal_tortoise", "journal_piccolo", "journal_asyncpg")


# -- qx: a plain dataclass mapped imperatively ----------------------------------------------


@dataclass(eq=False, kw_only=True)
class Journal(AggregateRoot):
    id: int | None = None
    level: int
    text: str


qx_metadata = make_metadata()
qx_journal = Table(
    "journal_qx",
    qx_metadata,
    Column("id", BigInteger(), primary_key=True, autoincrement=True),
    Column("level", Integer(), nullable=False),
    Column("text", String(255), nullable=False),
)
map_aggregate(make_registry(qx_metadata), Journal, qx_journal, version=None)


class Journals(Repository[Journal]):
    filterable = frozenset({"level", "text"})


class JournalUnitOfWork(UnitOfWork):
    journals: Journals


# -- hand-written SQLAlchemy ORM ------------------------------------------------------------


class OrmJournal:
    id: int
    level: int
    text: str


orm_metadata = MetaData()
orm_journal = Table(
    "journal_orm",
    orm_metadata,
    Column("id", BigInteger(), primary_key=True, autoincrement=True),
    Column("level", Integer(), nullable=False),
    Column("text", String(255), nullable=False),
)
sa_registry().map_imperatively(OrmJournal, orm_journal)


# An operation gets the ids of the rows it works on (the table is filled first) or, for the
# inserts, ``rows`` placeholders (the table is empty); it returns how many rows it read.
Loop = Callable[[list[int]], Awaitable[int]]

OPERATIONS: tuple[tuple[str, bool], ...] = (  # (name, table filled first)
    ("insert one", False),
    ("insert batch", False),
    ("bulk insert", False),
    ("get by key", True),
    ("filter large", True),
    ("filter small", True),
    ("update whole", True),
    ("update some", True),
    ("delete", True),
)
#: A read step repeats its operation over the same rows until it has lasted this long.
READ_STEP_SECONDS = 0.05
WRITES = {"insert one", "insert batch", "bulk insert", "update whole", "update some", "delete"}


def text_of(ident: int) -> str:
    return f"entry {ident}"  # what fill() writes, so filter small finds one row per query


def qx_loops(db: BenchDatabase) -> dict[str, Loop]:
    factory = UnitOfWorkFactory(JournalUnitOfWork, create_session_factory(db.engine))

    async def insert_one(ids: list[int]) -> int:
        for n in ids:
            async with factory() as uow:
                await uow.journals.add(Journal(level=2, text=text_of(n)))
                await uow.commit()
        return 0

    async def insert_batch(ids: list[int]) -> int:
        async with factory() as uow:
            for n in ids:
                await uow.journals.add(Journal(level=2, text=text_of(n)))
            await uow.commit()
        return 0

    async def bulk_insert(ids: list[int]) -> int:
        async with factory() as uow:
            await uow.journals.add_many([Journal(level=2, text=text_of(n)) for n in ids])
            await uow.commit()
        return 0

    async def get(ids: list[int]) -> int:
        async with factory() as uow:
            return sum([await uow.journals.get(ident) is not None for ident in ids])

    async def filter_large(ids: list[int]) -> int:
        async with factory() as uow:
            return len(await uow.journals.query().filter(level=1).all())

    async def filter_small(ids: list[int]) -> int:
        async with factory() as uow:
            query = uow.journals.query()
            return sum([len(await query.filter(text=text_of(ident)).all()) for ident in ids])

    async def update_whole(ids: list[int]) -> int:
        async with factory() as uow:
            for ident in ids:
                row = await uow.journals.require(ident)
                row.level += 1
                row.text = "changed"
            await uow.commit()
        return 0

    async def update_some(ids: list[int]) -> int:
        async with factory() as uow:
            for ident in ids:
                row = await uow.journals.require(ident)
                row.level += 1
            await uow.commit()
        return 0

    async def delete(ids: list[int]) -> int:
        async with factory() as uow:
            for ident in ids:
                await uow.journals.remove(await uow.journals.require(ident))
            await uow.commit()
        return 0

    return {
        "insert one": insert_one,
        "insert batch": insert_batch,
        "bulk insert": bulk_insert,
        "get by key": get,
        "filter large": filter_large,
        "filter small": filter_small,
        "update whole": update_whole,
        "update some": update_some,
        "delete": delete,
    }


def orm_loops(db: BenchDatabase) -> dict[str, Loop]:
    sessions = async_sessionmaker(db.engine, class_=AsyncSession, expire_on_commit=False)

    def new(n: int) -> OrmJournal:
        row = OrmJournal()
        row.level, row.text = 2, text_of(n)
        return row

    async def insert_one(ids: list[int]) -> int:
        for n in ids:
            async with sessions() as session, session.begin():
                session.add(new(n))
        return 0

    async def insert_batch(ids: list[int]) -> int:
        async with sessions() as session, session.begin():
            for n in ids:
                session.add(new(n))
        return 0

    async def bulk_insert(ids: list[int]) -> int:
        async with sessions() as session, session.begin():
            session.add_all([new(n) for n in ids])
        return 0

    async def get(ids: list[int]) -> int:
        async with sessions() as session:
            return sum([await session.get(OrmJournal, ident) is not None for ident in ids])

    async def filter_large(ids: list[int]) -> int:
        async with sessions() as session:
            found = await session.scalars(select(OrmJournal).where(OrmJournal.level == 1))
            return len(found.all())

    async def filter_small(ids: list[int]) -> int:
        async with sessions() as session:
            total = 0
            for ident in ids:
                query = select(OrmJournal).where(OrmJournal.text == text_of(ident))
                total += len((await session.scalars(query)).all())
            return total

    async def update_whole(ids: list[int]) -> int:
        async with sessions() as session, session.begin():
            for ident in ids:
                row = await session.get(OrmJournal, ident)
                assert row is not None
                row.level += 1
                row.text = "changed"
        return 0

    async def update_some(ids: list[int]) -> int:
        async with sessions() as session, session.begin():
            for ident in ids:
                row = await session.get(OrmJournal, ident)
                assert row is not None
                row.level += 1
        return 0

    async def delete(ids: list[int]) -> int:
        async with sessions() as session, session.begin():
            for ident in ids:
                row = await session.get(OrmJournal, ident)
                await session.delete(row)
        return 0

    return {
        "insert one": insert_one,
        "insert batch": insert_batch,
        "bulk insert": bulk_insert,
        "get by key": get,
        "filter large": filter_large,
        "filter small": filter_small,
        "update whole": update_whole,
        "update some": update_some,
        "delete": delete,
    }


_INSERT = "INSERT INTO journal_asyncpg (level, text) VALUES ($1, $2) RETURNING id"
_SELECT = "SELECT id, level, text FROM journal_asyncpg"


def asyncpg_loops(pool: asyncpg.Pool) -> dict[str, Loop]:
    async def insert_one(ids: list[int]) -> int:
        for n in ids:
            async with pool.acquire() as conn:
                await conn.fetchval(_INSERT, 2, text_of(n))
        return 0

    async def insert_batch(ids: list[int]) -> int:
        async with pool.acquire() as conn, conn.transaction():
            for n in ids:
                await conn.fetchval(_INSERT, 2, text_of(n))
        return 0

    async def bulk_insert(ids: list[int]) -> int:
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO journal_asyncpg (level, text) VALUES ($1, $2)",
                [(2, text_of(n)) for n in ids],
            )
        return 0

    async def get(ids: list[int]) -> int:
        async with pool.acquire() as conn:
            return sum(
                [await conn.fetchrow(f"{_SELECT} WHERE id = $1", i) is not None for i in ids]
            )

    async def filter_large(ids: list[int]) -> int:
        async with pool.acquire() as conn:
            return len(await conn.fetch(f"{_SELECT} WHERE level = $1", 1))

    async def filter_small(ids: list[int]) -> int:
        async with pool.acquire() as conn:
            return sum(
                [len(await conn.fetch(f"{_SELECT} WHERE text = $1", text_of(i))) for i in ids]
            )

    async def update(ids: list[int], *, whole: bool) -> int:
        async with pool.acquire() as conn, conn.transaction():
            for ident in ids:
                row = await conn.fetchrow(f"{_SELECT} WHERE id = $1", ident)
                if whole:
                    await conn.execute(
                        "UPDATE journal_asyncpg SET level = $2, text = $3 WHERE id = $1",
                        ident,
                        row["level"] + 1,
                        "changed",
                    )
                else:
                    await conn.execute(
                        "UPDATE journal_asyncpg SET level = $2 WHERE id = $1",
                        ident,
                        row["level"] + 1,
                    )
        return 0

    async def update_whole(ids: list[int]) -> int:
        return await update(ids, whole=True)

    async def update_some(ids: list[int]) -> int:
        return await update(ids, whole=False)

    async def delete(ids: list[int]) -> int:
        async with pool.acquire() as conn, conn.transaction():
            for ident in ids:
                await conn.fetchrow(f"{_SELECT} WHERE id = $1", ident)
                await conn.execute("DELETE FROM journal_asyncpg WHERE id = $1", ident)
        return 0

    return {
        "insert one": insert_one,
        "insert batch": insert_batch,
        "bulk insert": bulk_insert,
        "get by key": get,
        "filter large": filter_large,
        "filter small": filter_small,
        "update whole": update_whole,
        "update some": update_some,
        "delete": delete,
    }


async def tortoise_loops(db: BenchDatabase) -> dict[str, Loop] | None:
    try:
        from tortoise import Tortoise, fields
        from tortoise.models import Model
        from tortoise.transactions import in_transaction
    except ImportError:
        print("tortoise-orm is not installed: skipped (make bench installs it)")
        return None

    class TortoiseJournal(Model):
        id = fields.BigIntField(primary_key=True)
        level = fields.IntField()
        text = fields.CharField(max_length=255)

        class Meta:
            table = "journal_tortoise"
            app = "peers"

    globals()["TortoiseJournal"] = TortoiseJournal  # Tortoise finds models in a module
    url = asyncpg_url(db)
    await Tortoise.init(
        config={
            "connections": {
                "default": {
                    "engine": "tortoise.backends.asyncpg",
                    "credentials": {**url, "schema": db.schema},
                }
            },
            "apps": {"peers": {"models": [__name__], "default_connection": "default"}},
        }
    )

    async def insert_one(ids: list[int]) -> int:
        for n in ids:
            await TortoiseJournal.create(level=2, text=text_of(n))
        return 0

    async def insert_batch(ids: list[int]) -> int:
        async with in_transaction():
            for n in ids:
                await TortoiseJournal.create(level=2, text=text_of(n))
        return 0

    async def bulk_insert(ids: list[int]) -> int:
        async with in_transaction():
            await TortoiseJournal.bulk_create(
                [TortoiseJournal(level=2, text=text_of(n)) for n in ids]
            )
        return 0

    async def get(ids: list[int]) -> int:
        return sum([await TortoiseJournal.get_or_none(id=i) is not None for i in ids])

    async def filter_large(ids: list[int]) -> int:
        return len(await TortoiseJournal.filter(level=1))

    async def filter_small(ids: list[int]) -> int:
        return sum([len(await TortoiseJournal.filter(text=text_of(i))) for i in ids])

    async def update(ids: list[int], *, whole: bool) -> int:
        async with in_transaction():
            for ident in ids:
                row = await TortoiseJournal.get(id=ident)
                row.level += 1
                if whole:
                    row.text = "changed"
                    await row.save()
                else:
                    await row.save(update_fields=["level"])
        return 0

    async def update_whole(ids: list[int]) -> int:
        return await update(ids, whole=True)

    async def update_some(ids: list[int]) -> int:
        return await update(ids, whole=False)

    async def delete(ids: list[int]) -> int:
        async with in_transaction():
            for ident in ids:
                row = await TortoiseJournal.get(id=ident)
                await row.delete()
        return 0

    return {
        "insert one": insert_one,
        "insert batch": insert_batch,
        "bulk insert": bulk_insert,
        "get by key": get,
        "filter large": filter_large,
        "filter small": filter_small,
        "update whole": update_whole,
        "update some": update_some,
        "delete": delete,
    }


async def piccolo_loops(db: BenchDatabase) -> tuple[dict[str, Loop], Any] | None:
    try:
        from piccolo.columns import BigSerial, Varchar
        from piccolo.columns import Integer as PInteger
        from piccolo.engine.postgres import PostgresEngine
        from piccolo.table import Table as PTable
    except ImportError:
        print("piccolo is not installed: skipped (make bench installs it)")
        return None
    url = asyncpg_url(db)
    engine = PostgresEngine(
        config={**url, "server_settings": {"search_path": db.schema}}, log_queries=False
    )
    await engine.start_connection_pool(min_size=2, max_size=2)

    class PiccoloJournal(PTable, tablename="journal_piccolo", db=engine):
        id = BigSerial(primary_key=True)
        level = PInteger()
        text = Varchar(length=255)

    async def insert_one(ids: list[int]) -> int:
        for n in ids:
            await PiccoloJournal(level=2, text=text_of(n)).save()
        return 0

    async def insert_batch(ids: list[int]) -> int:
        async with engine.transaction():
            for n in ids:
                await PiccoloJournal(level=2, text=text_of(n)).save()
        return 0

    async def bulk_insert(ids: list[int]) -> int:
        async with engine.transaction():
            await PiccoloJournal.insert(*[PiccoloJournal(level=2, text=text_of(n)) for n in ids])
        return 0

    async def get(ids: list[int]) -> int:
        return sum(
            [await PiccoloJournal.objects().get(PiccoloJournal.id == i) is not None for i in ids]
        )

    async def filter_large(ids: list[int]) -> int:
        return len(await PiccoloJournal.objects().where(PiccoloJournal.level == 1))

    async def filter_small(ids: list[int]) -> int:
        return sum(
            [
                len(await PiccoloJournal.objects().where(PiccoloJournal.text == text_of(i)))
                for i in ids
            ]
        )

    async def update(ids: list[int], *, whole: bool) -> int:
        async with engine.transaction():
            for ident in ids:
                row = await PiccoloJournal.objects().get(PiccoloJournal.id == ident)
                row.level += 1
                if whole:
                    row.text = "changed"
                    await row.save()
                else:
                    await row.save([PiccoloJournal.level])
        return 0

    async def update_whole(ids: list[int]) -> int:
        return await update(ids, whole=True)

    async def update_some(ids: list[int]) -> int:
        return await update(ids, whole=False)

    async def delete(ids: list[int]) -> int:
        async with engine.transaction():
            for ident in ids:
                row = await PiccoloJournal.objects().get(PiccoloJournal.id == ident)
                await row.remove()
        return 0

    return {
        "insert one": insert_one,
        "insert batch": insert_batch,
        "bulk insert": bulk_insert,
        "get by key": get,
        "filter large": filter_large,
        "filter small": filter_small,
        "update whole": update_whole,
        "update some": update_some,
        "delete": delete,
    }, engine


def asyncpg_url(db: BenchDatabase) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    url = make_url(db.url)
    return {
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "user": url.username or "postgres",
        "password": url.password or "",
        "database": url.database or "postgres",
    }


async def fill(pool: asyncpg.Pool, table: str, rows: int, *, filled: bool) -> list[int]:
    """Fresh rows for one round, or an empty table and ``rows`` numbers (not measured)."""
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {table} RESTART IDENTITY")
        if not filled:
            return list(range(1, rows + 1))
        found = await conn.fetch(
            f"INSERT INTO {table} (level, text) SELECT 1, 'entry ' || n"
            " FROM generate_series(1, $1) AS n RETURNING id",
            rows,
        )
    return [r["id"] for r in found]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_url_argument(parser)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="steps per round, each on fresh rows (a round's figure is their sum: one step "
        "of a fast operation is a few milliseconds of CPU, too short to measure alone)",
    )
    parser.add_argument("--json", default=None, help="write the results table here")
    args = parser.parse_args()
    print(versions())
    async with bench_schema(args.url) as db:
        async with db.engine.begin() as conn:
            for table in TABLES:
                await conn.execute(
                    text(
                        f"CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, level INT NOT NULL,"
                        " text VARCHAR(255) NOT NULL)"
                    )
                )
        pool = await db.asyncpg_pool(4)
        loops: dict[str, tuple[str, dict[str, Loop]]] = {
            "qx": ("journal_qx", qx_loops(db)),
            "SQLAlchemy ORM": ("journal_orm", orm_loops(db)),
            "raw asyncpg": ("journal_asyncpg", asyncpg_loops(pool)),
        }
        tortoise = await tortoise_loops(db)
        if tortoise is not None:
            loops["Tortoise ORM"] = ("journal_tortoise", tortoise)
        piccolo = await piccolo_loops(db)
        if piccolo is not None:
            loops["Piccolo"] = ("journal_piccolo", piccolo[0])
        best: dict[tuple[str, str], tuple[float, float]] = {}
        try:
            for operation, filled in OPERATIONS:
                for _ in range(args.rounds):
                    for name, (table, by_operation) in loops.items():
                        cpu = wall = 0.0
                        done = 0  # rows the steps worked on (reads: every pass)
                        for _ in range(args.repeat):
                            ids = await fill(pool, table, args.rows, filled=filled)
                            # Garbage an earlier step left is collected now, not inside
                            # this step's measurement (its own garbage still is).
                            gc.collect()
                            cpu_at, wall_at = time.process_time(), time.perf_counter()
                            reads = []
                            while True:
                                reads.append(await by_operation[operation](ids))
                                # A write needs fresh rows; a read passes over the same rows
                                # until the step spans READ_STEP_SECONDS: one query of 300 rows
                                # (~3 ms) is too short for process_time to compare reliably.
                                if operation in WRITES:
                                    break
                                if time.perf_counter() - wall_at >= READ_STEP_SECONDS:
                                    break
                            cpu += time.process_time() - cpu_at
                            wall += time.perf_counter() - wall_at
                            done += args.rows * len(reads)
                            for read in reads:
                                await check(pool, table, operation, args.rows, read, name)
                        cpu = cpu / done * 1e6
                        wall = wall / done * 1e6
                        key = (name, operation)
                        if key not in best or cpu < best[key][0]:
                            best[key] = (cpu, wall)
        finally:
            await pool.close()
            if tortoise is not None:
                from tortoise import Tortoise

                await Tortoise.close_connections()
            if piccolo is not None:
                await piccolo[1].close_connection_pool()
    rows: list[list[object]] = []
    has_tortoise = "Tortoise ORM" in loops
    print(
        f"{'per row':<24}{'CPU µs':>9}{'wall µs':>9}{'rows/s':>9}{'CPU/ORM':>9}"
        + (f"{'CPU/Tortoise':>14}" if has_tortoise else "")
    )
    for operation, _filled in OPERATIONS:
        print(operation)
        base = best[("SQLAlchemy ORM", operation)][0]
        tortoise_cpu = best[("Tortoise ORM", operation)][0] if has_tortoise else None
        for name in loops:
            cpu, wall = best[(name, operation)]
            versus = f"{cpu / tortoise_cpu:.2f}x" if tortoise_cpu else "-"
            print(
                f"  {name:<22}{cpu:>9.0f}{wall:>9.0f}{1e6 / wall:>9.0f}{cpu / base:>8.2f}x"
                + (f"{versus:>14}" if has_tortoise else "")
            )
            rows.append(
                [
                    operation,
                    name,
                    f"{cpu:.0f}",
                    f"{wall:.0f}",
                    f"{1e6 / wall:.0f}",
                    f"{cpu / base:.2f}x",
                    versus,
                ]
            )
    save_table(
        args.json,
        f"qx beside its peers, {args.rows} rows per operation x {args.repeat} steps per round, "
        f"best of {args.rounds} rounds "
        "(client CPU and wall time per row; ratios of CPU to SQLAlchemy ORM and to Tortoise)",
        [
            "operation",
            "library",
            "CPU µs/row",
            "wall µs/row",
            "rows/s",
            "CPU vs ORM",
            "CPU vs Tortoise",
        ],
        rows,
    )


async def check(
    pool: asyncpg.Pool, table: str, operation: str, rows: int, read: int, name: str
) -> None:
    """What the database holds after one round is what the operation must have done."""
    async with pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM {table}")
        untouched = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE level = 1")
        changed = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE text = 'changed'")
    expected = {
        "insert one": (rows, 0, 0),
        "insert batch": (rows, 0, 0),
        "bulk insert": (rows, 0, 0),
        "update whole": (rows, 0, rows),
        "update some": (rows, 0, 0),
        "delete": (0, 0, 0),
    }.get(operation, (rows, rows, 0))
    assert (total, untouched, changed) == expected, (name, operation, total, untouched, changed)
    if operation not in WRITES:
        assert read == rows, (name, operation, read)


if __name__ == "__main__":
    asyncio.run(main())
