"""Benchmark: qx beside the ORMs people compare it with, per row of a loop in one transaction.

The loops of the public tortoise/orm-benchmarks harness that cost qx most: load a row by
primary key, change it (or delete it), next row, one commit at the end. Each library is
written as its own documentation shows, on its own copy of a small ``journal`` table in one
fresh PostgreSQL schema, in one process and one run; rounds alternate between libraries and
the best round of each is kept. Reported: client CPU per row (``time.process_time``, what
the Python process spends; the server's work is not in it) and wall time per row, with the
ratio of CPU to SQLAlchemy ORM's.

    python bench/peers.py [--url postgresql+asyncpg://postgres@127.0.0.1:5432/test]
                          [--rows 300] [--rounds 3]

Tortoise ORM and Piccolo are in the ``bench`` dependency group (``make bench`` installs it);
a library that is not installed is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from common import BenchDatabase, add_url_argument, bench_schema, save_table, versions
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, text
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
    pass


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


Loop = Callable[[list[int]], Awaitable[None]]


def qx_loops(db: BenchDatabase) -> dict[str, Loop]:
    factory = UnitOfWorkFactory(JournalUnitOfWork, create_session_factory(db.engine))

    async def update(ids: list[int]) -> None:
        async with factory() as uow:
            for ident in ids:
                row = await uow.journals.require(ident)
                row.level += 1
            await uow.commit()

    async def delete(ids: list[int]) -> None:
        async with factory() as uow:
            for ident in ids:
                await uow.journals.remove(await uow.journals.require(ident))
            await uow.commit()

    return {"update": update, "delete": delete}


def orm_loops(db: BenchDatabase) -> dict[str, Loop]:
    sessions = async_sessionmaker(db.engine, class_=AsyncSession, expire_on_commit=False)

    async def update(ids: list[int]) -> None:
        async with sessions() as session, session.begin():
            for ident in ids:
                row = await session.get(OrmJournal, ident)
                assert row is not None
                row.level += 1

    async def delete(ids: list[int]) -> None:
        async with sessions() as session, session.begin():
            for ident in ids:
                row = await session.get(OrmJournal, ident)
                await session.delete(row)

    return {"update": update, "delete": delete}


_SELECT = "SELECT id, level, text FROM journal_asyncpg WHERE id = $1"


def asyncpg_loops(pool: asyncpg.Pool) -> dict[str, Loop]:
    async def update(ids: list[int]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            for ident in ids:
                row = await conn.fetchrow(
                    "SELECT id, level, text FROM journal_asyncpg WHERE id = $1", ident
                )
                await conn.execute(
                    "UPDATE journal_asyncpg SET level = $2 WHERE id = $1", ident, row["level"] + 1
                )

    async def delete(ids: list[int]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            for ident in ids:
                await conn.fetchrow(
                    "SELECT id, level, text FROM journal_asyncpg WHERE id = $1", ident
                )
                await conn.execute("DELETE FROM journal_asyncpg WHERE id = $1", ident)

    return {"update": update, "delete": delete}


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

    async def update(ids: list[int]) -> None:
        async with in_transaction():
            for ident in ids:
                row = await TortoiseJournal.get(id=ident)
                row.level += 1
                await row.save()

    async def delete(ids: list[int]) -> None:
        async with in_transaction():
            for ident in ids:
                row = await TortoiseJournal.get(id=ident)
                await row.delete()

    return {"update": update, "delete": delete}


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

    async def update(ids: list[int]) -> None:
        async with engine.transaction():
            for ident in ids:
                row = await PiccoloJournal.objects().get(PiccoloJournal.id == ident)
                row.level += 1
                await row.save([PiccoloJournal.level])

    async def delete(ids: list[int]) -> None:
        async with engine.transaction():
            for ident in ids:
                row = await PiccoloJournal.objects().get(PiccoloJournal.id == ident)
                await row.remove()

    return {"update": update, "delete": delete}, engine


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


async def fill(pool: asyncpg.Pool, table: str, rows: int) -> list[int]:
    """Fresh rows for one round (not measured)."""
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {table} RESTART IDENTITY")
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
            for operation in ("update", "delete"):
                for _ in range(args.rounds):
                    for name, (table, by_operation) in loops.items():
                        ids = await fill(pool, table, args.rows)
                        cpu, wall = time.process_time(), time.perf_counter()
                        await by_operation[operation](ids)
                        cpu = (time.process_time() - cpu) / args.rows * 1e6
                        wall = (time.perf_counter() - wall) / args.rows * 1e6
                        async with pool.acquire() as conn:
                            left = await conn.fetchval(
                                f"SELECT count(*) FROM {table} WHERE level = 1"
                            )
                        assert left == 0, (name, operation, left)  # every row changed / gone
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
    print(f"{'per row, one transaction':<22}{'CPU µs':>10}{'wall µs':>10}{'CPU / ORM':>11}")
    for operation in ("update", "delete"):
        print(f"loop: load by key, {operation}")
        base = best[("SQLAlchemy ORM", operation)][0]
        for name in loops:
            cpu, wall = best[(name, operation)]
            print(f"  {name:<20}{cpu:>10.0f}{wall:>10.0f}{cpu / base:>10.2f}x")
            rows.append([f"{operation}: {name}", f"{cpu:.0f}", f"{wall:.0f}", f"{cpu / base:.2f}x"])
    save_table(
        args.json,
        f"Loops of load-by-key and change/delete, {args.rows} rows in one transaction "
        "(client CPU and wall time per row; ratio of CPU to SQLAlchemy ORM)",
        ["library", "CPU µs/row", "wall µs/row", "CPU vs ORM"],
        rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
