"""Reads on streaming replicas (issue 24), on a PostgreSQL primary and two standbys of the
test's own: one replaying at once, one 2 s behind (``recovery_min_apply_delay``).

What the database answered is asserted, not how qx says it routed: each read asks its own
server ``pg_is_in_recovery()`` and ``inet_server_port()``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from uuid import UUID

import httpx
import pytest
from sqlalchemy import Column, String, Table, text
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core import AggregateRoot, new_id, request_context
from qx.cqrs import MessageBus, Query
from qx.db import (
    Replicas,
    Repository,
    UnitOfWork,
    UnitOfWorkFactory,
    create_engine,
    create_session_factory,
    make_metadata,
    make_registry,
    map_aggregate,
    tenant_column,
    uuid_pk,
    version_column,
)
from qx.errors import ConfigurationError, InvalidConsistencyToken, UnitOfWorkError
from qx.examples.orders.api import create_app
from qx.examples.orders.infrastructure import metadata as orders_metadata
from qx.settings import DatabaseSettings, QxSettings, ReplicaSettings
from tests.integration.pg_cluster import PgCluster, PgServer, cluster_or_skip

SECRET = "replica-test-secret-0123456789"
DELAY = 2.0

md = make_metadata()
reg = make_registry(md)


@dataclass(eq=False, kw_only=True)
class Note(AggregateRoot):
    text: str
    id: UUID = field(default_factory=new_id)
    tenant_id: str | None = None
    version: int | None = None


map_aggregate(
    reg,
    Note,
    Table(
        "replica_notes",
        md,
        uuid_pk(),
        tenant_column(),
        Column("text", String(200), nullable=False),
        version_column(),
    ),
)


class Notes(Repository[Note]):
    pass


class NotesUnitOfWork(UnitOfWork):
    notes: Notes


@dataclass
class Servers:
    cluster: PgCluster
    primary: PgServer
    fast: PgServer
    slow: PgServer


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    cluster = cluster_or_skip("the replica tests start their own PostgreSQL primary and standbys")
    try:
        primary = cluster.start_primary()
        fast = cluster.add_standby("fast")
        slow = cluster.add_standby("slow", recovery_min_apply_delay=f"'{int(DELAY * 1000)}ms'")
        yield Servers(cluster, primary, fast, slow)
    finally:
        cluster.stop()


@pytest.fixture
async def primary(servers: Servers) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url=servers.primary.url())
    async with engine.begin() as conn:
        exists = await conn.scalar(text("SELECT to_regclass('replica_notes') IS NOT NULL"))
        await conn.run_sync(md.create_all)
    if not exists:  # every standby has the table before a test reads there
        servers.cluster.wait_caught_up(servers.fast)
        servers.cluster.wait_caught_up(servers.slow)
    yield engine
    await engine.dispose()


def replica_set(*pairs: tuple[PgServer, int], **options: float) -> Replicas:
    return Replicas([(create_engine(url=s.url()), weight) for s, weight in pairs], **options)


async def served_by(uow: NotesUnitOfWork) -> tuple[bool, int]:
    row = (await uow.session.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))).one()
    return bool(row[0]), int(row[1])


async def write_note(factory: UnitOfWorkFactory[NotesUnitOfWork], body: str) -> tuple[UUID, str]:
    async with factory() as uow:
        note = Note(text=body)
        await uow.notes.add(note)
        await uow.commit()
    assert uow.consistency_token is not None
    return note.id, uow.consistency_token


async def test_a_token_reads_the_write_on_the_delayed_replica_once_replayed_never_stale(
    servers: Servers, primary: AsyncEngine
) -> None:
    replicas = replica_set((servers.slow, 1), wait=DELAY * 3)
    factory = UnitOfWorkFactory(
        NotesUnitOfWork,
        create_session_factory(primary),
        replicas=replicas,
        cursor_secret=SECRET,
    )
    try:
        with request_context(tenant_id="t1"):
            note_id, token = await write_note(factory, "first")
            # Without the token the replica answers at once, with what it has replayed: the
            # note is not there yet (2 s of apply delay).
            async with factory.read_only() as uow:
                assert await served_by(uow) == (True, servers.slow.port)
                assert await uow.notes.get(note_id) is None
            # With it: the replica, once it has replayed the write, and the note is there.
            async with factory.read_only(consistency_token=token) as uow:
                assert await served_by(uow) == (True, servers.slow.port)
                assert (await uow.notes.require(note_id)).text == "first"
            # The token travels in the request context too (an HTTP header in an API).
            _second, token2 = await write_note(factory, "second")
            with request_context(consistency_token=token2):
                async with factory.read_only() as uow:
                    assert {n.text for n in await uow.notes.query().all()} == {"first", "second"}
        # A wait shorter than the delay: the primary answers, in a read-only transaction.
        short = UnitOfWorkFactory(
            NotesUnitOfWork,
            create_session_factory(primary),
            replicas=replica_set((servers.slow, 1), wait=0.2),
            cursor_secret=SECRET,
        )
        with request_context(tenant_id="t1"):
            third, token3 = await write_note(factory, "third")
            async with short.read_only(consistency_token=token3) as uow:
                assert await served_by(uow) == (False, servers.primary.port)
                assert (await uow.notes.require(third)).text == "third"
                (await uow.notes.require(third)).text = "changed"
                with pytest.raises(UnitOfWorkError, match="read-only"):
                    await uow.commit()
            assert short.replicas is not None and short.replicas.fallbacks == 1
            await short.replicas.dispose()
    finally:
        await replicas.dispose()


async def test_tokens_are_refused_when_forged_or_from_another_tenant(
    servers: Servers, primary: AsyncEngine
) -> None:
    replicas = replica_set((servers.fast, 1))
    factory = UnitOfWorkFactory(
        NotesUnitOfWork, create_session_factory(primary), replicas=replicas, cursor_secret=SECRET
    )
    other_service = UnitOfWorkFactory(
        NotesUnitOfWork,
        create_session_factory(primary),
        replicas=replicas,
        cursor_secret="another-secret-0123456789",
    )
    try:
        with request_context(tenant_id="t1"):
            _note, token = await write_note(factory, "mine")
        body, _dot, tag = token.partition(".")
        forged = [
            "",
            "x" * 600,
            "no-dot",
            token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
            f"{body[:-1]}A.{tag}",
        ]
        with request_context(tenant_id="t1"):
            for bad in forged:
                with pytest.raises(InvalidConsistencyToken) as caught:
                    async with factory.read_only(consistency_token=bad):
                        pass
                assert caught.value.field == "consistency_token"
                assert len(str(caught.value)) < 200
            with pytest.raises(InvalidConsistencyToken, match="not signed"):
                async with other_service.read_only(consistency_token=token):
                    pass
        with (
            request_context(tenant_id="t2"),
            pytest.raises(InvalidConsistencyToken, match="tenant"),
        ):
            async with factory.read_only(consistency_token=token):
                pass
    finally:
        await replicas.dispose()


async def test_weights_share_reads_and_a_stopped_replica_hands_its_share_over(
    servers: Servers, primary: AsyncEngine
) -> None:
    @dataclass(frozen=True, kw_only=True)
    class WhoAnswers(Query[tuple[bool, int]]):
        pass

    bus = MessageBus()

    @bus.handler(WhoAnswers)
    async def who_answers(query: WhoAnswers, uow: NotesUnitOfWork) -> tuple[bool, int]:
        answer = await served_by(uow)
        await uow.notes.query().count()
        return answer

    replicas = replica_set((servers.fast, 1), (servers.slow, 3), max_lag=60.0, retry=60.0)
    factory = UnitOfWorkFactory(
        NotesUnitOfWork, create_session_factory(primary), replicas=replicas, cursor_secret=SECRET
    )
    bus.provide(uow_factory=factory)
    ports: Counter[int] = Counter()

    async def read() -> None:
        # Through the bus, as a service reads: a query cut off with its replica is retried.
        with request_context(tenant_id="t1"):
            in_recovery, port = await bus.ask(WhoAnswers())
        assert in_recovery
        ports[port] += 1

    try:
        for _ in range(1000):
            await read()
        assert abs(ports[servers.fast.port] / 1000 - 0.25) <= 0.05
        assert abs(ports[servers.slow.port] / 1000 - 0.75) <= 0.05
        # Stopped mid-run: no read fails, the other replica takes every read.
        ports.clear()
        stop = asyncio.get_running_loop().run_in_executor(
            None, lambda: servers.cluster.stop_server(servers.slow, mode="immediate")
        )
        while not stop.done():
            await read()
        await stop
        before = ports[servers.fast.port]
        for _ in range(200):
            await read()
        assert ports[servers.fast.port] - before == 200
    finally:
        if not servers.slow.running:
            servers.cluster.start(servers.slow)
        await replicas.dispose()


async def test_bus_queries_read_on_a_replica_with_the_context_token(
    servers: Servers, primary: AsyncEngine
) -> None:
    @dataclass(frozen=True, kw_only=True)
    class NoteText(Query[str]):
        note_id: UUID

    bus = MessageBus()

    @bus.handler(NoteText)
    async def note_text(query: NoteText, uow: NotesUnitOfWork) -> str:
        in_recovery, _port = await served_by(uow)
        assert in_recovery
        return (await uow.notes.require(query.note_id)).text

    replicas = replica_set((servers.slow, 1), wait=DELAY * 3)
    factory = UnitOfWorkFactory(
        NotesUnitOfWork,
        create_session_factory(primary),
        replicas=replicas,
        cursor_secret=SECRET,
        dispatcher=bus,
    )
    bus.provide(uow_factory=factory)
    try:
        with request_context(tenant_id="t1"):
            note_id, token = await write_note(factory, "via the bus")
            with request_context(consistency_token=token):
                assert await bus.ask(NoteText(note_id=note_id)) == "via the bus"
    finally:
        await replicas.dispose()


async def test_settings_name_replicas_and_bad_ones_are_refused(servers: Servers) -> None:
    settings = DatabaseSettings(
        url=servers.primary.url(),
        replicas=[
            ReplicaSettings(url=servers.fast.url(), weight=1, pool_size=2),
            ReplicaSettings(url=servers.slow.url(), weight=3),
        ],
        replica_max_lag=3.0,
    )
    replicas = Replicas.from_settings(settings)
    assert replicas is not None
    try:
        assert [r.weight for r in replicas.replicas] == [1, 3]
        assert replicas.max_lag == 3.0
        assert replicas.replicas[0].engine.pool.size() == 2  # type: ignore[attr-defined]
    finally:
        await replicas.dispose()
    assert Replicas.from_settings(DatabaseSettings(url=servers.primary.url())) is None
    sqlite = create_engine(url="sqlite+aiosqlite:///:memory:")
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        Replicas([(sqlite, 1)])
    await sqlite.dispose()
    engine = create_engine(url=servers.fast.url())
    with pytest.raises(ConfigurationError, match="weight"):
        Replicas([(engine, -1)])
    with pytest.raises(ConfigurationError, match="above 0"):
        Replicas([(engine, 0)])
    with pytest.raises(ConfigurationError, match="cursor_secret"):
        UnitOfWorkFactory(
            NotesUnitOfWork, create_session_factory(engine), replicas=Replicas([(engine, 1)])
        )
    await engine.dispose()


async def test_the_api_hands_a_token_after_a_command_and_reads_with_it(servers: Servers) -> None:
    # The orders example on the primary, with the 2 s delayed standby as its only replica: a
    # browser that sends back the token of its command sees its order on the very next
    # request; a forged token or another tenant's is refused (422, problem+json).
    engine = create_engine(url=servers.primary.url())
    async with engine.begin() as conn:
        await conn.run_sync(orders_metadata.create_all)
    servers.cluster.wait_caught_up(servers.slow)
    settings = QxSettings(
        pagination_secret=SECRET,
        db=DatabaseSettings(
            url=servers.primary.url(),
            replicas=[ReplicaSettings(url=servers.slow.url())],
            replica_wait=DELAY * 3,
        ),
    )
    app = create_app(settings=settings, engine=engine)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", headers={"X-Tenant-ID": "acme"}
            ) as http:
                stocked = await http.post(
                    "/products",
                    json={"sku": "R-1", "name": "r", "price": "1.00", "quantity": 5},
                )
                assert stocked.status_code == 201, stocked.text
                placed = await http.post(
                    "/orders",
                    json={"customer": "ada", "lines": [{"sku": "R-1", "quantity": 1}]},
                    headers={"X-Consistency-Token": stocked.headers["X-Consistency-Token"]},
                )
                assert placed.status_code == 201, placed.text
                token = placed.headers["X-Consistency-Token"]
                order_id = placed.json()["id"]
                seen = await http.get(f"/orders/{order_id}", headers={"X-Consistency-Token": token})
                assert seen.status_code == 200 and seen.json()["status"] == "placed"
                for bad, tenant in (("forged.token", "acme"), (token, "other")):
                    refused = await http.get(
                        f"/orders/{order_id}",
                        headers={"X-Consistency-Token": bad, "X-Tenant-ID": tenant},
                    )
                    assert refused.status_code == 422, refused.text
                    assert refused.headers["content-type"] == "application/problem+json"
    finally:
        await engine.dispose()
