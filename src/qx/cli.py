"""The ``qx`` command line (needs the ``cli`` extra: ``pip install 'qx[cli]'``)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Annotated, Any

from qx.core._errors import ConfigurationError, QxError

try:
    import typer
    from rich.console import Console
    from rich.table import Table

    # Module level: annotations are evaluated in this module's namespace.
    _CONFIG_OPTION = typer.Option(
        "--config", "-c", help="alembic.ini, or a migrations directory (default: ./alembic.ini)."
    )
    _ROUTER_OPTION = typer.Option("--router", help="package.module:router (an EventRouter).")
    _UOW_OPTION = typer.Option(
        "--uow", help="package.module:YourUnitOfWork (a UnitOfWork subclass)."
    )
except ImportError:  # pragma: no cover - exercised only without the extra
    typer = None  # type: ignore[assignment]

__all__ = ["app", "main"]


def _build_app() -> typer.Typer:
    app = typer.Typer(
        help="qx: persistence toolkit for async Python services.", no_args_is_help=True
    )
    console = Console()

    @app.callback()
    def _root(
        log_level: Annotated[
            str | None,
            typer.Option("--log-level", help="Log at DEBUG, INFO, WARNING or ERROR to stderr."),
        ] = None,
        log_json: Annotated[
            bool, typer.Option("--log-json", help="Log one JSON object per line.")
        ] = False,
    ) -> None:
        """qx command line."""
        if log_level is None and not log_json:
            return  # the defaults: warnings, as text, and whatever alembic.ini asks for
        _configure_logging(log_level or "WARNING", json_lines=log_json)

    @app.command()
    def demo(
        orders: Annotated[
            int, typer.Option("--orders", min=1, max=100_000, help="Orders to place.")
        ] = 200,
        concurrency: Annotated[
            int, typer.Option("--concurrency", min=1, max=256, help="Commands in flight.")
        ] = 8,
        serve: Annotated[
            bool, typer.Option("--serve", help="Run the orders HTTP service instead.")
        ] = False,
        port: Annotated[int, typer.Option("--port", help="Port for --serve.")] = 8000,
    ) -> None:
        """Run the orders example on QX_DB__URL (default: SQLite file ./qx.sqlite3) and the
        broker of QX_BROKER__URL (default: in memory)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from qx._demo import run_demo
        from qx.settings import load_settings

        with _one_line(console, what="qx demo failed"):
            settings = load_settings()
            if serve:
                _serve(settings, port)
                return
            with Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=True,
            ) as bar:
                tasks: dict[str, Any] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=max(total, 1))
                    bar.update(tasks[stage], completed=done, total=max(total, 1))

                report = asyncio.run(
                    run_demo(
                        settings, orders_count=orders, concurrency=concurrency, progress=progress
                    )
                )
        _print_report(console, report)

    app.add_typer(_outbox_app(console), name="outbox")
    app.add_typer(_inbox_app(console), name="inbox")
    app.add_typer(_db_app(console), name="db")
    return app


def _inbox_app(console: Console) -> typer.Typer:
    inbox = typer.Typer(help="Consume events into the idempotent inbox.", no_args_is_help=True)

    @inbox.command("run")
    def run_command(
        router: Annotated[str, _ROUTER_OPTION],
        uow: Annotated[str, _UOW_OPTION],
        consumer: Annotated[
            str,
            typer.Option(
                "--consumer", help="This service's name: inbox consumer, durable, queue, group."
            ),
        ],
        concurrency: Annotated[
            int,
            typer.Option(
                "--concurrency",
                min=1,
                help="Subscribers (with QX_BROKER__PARTITIONS: group members) in this process.",
            ),
        ] = 1,
        lease_seconds: Annotated[
            float,
            typer.Option(
                "--lease-seconds",
                min=0.5,
                help="With QX_BROKER__PARTITIONS: how long a dead process's partitions wait.",
            ),
        ] = 10.0,
        metrics_port: Annotated[
            int | None, typer.Option("--metrics-port", help="Serve Prometheus /metrics.")
        ] = None,
        log_level: Annotated[
            str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
        ] = None,
        log_json: Annotated[
            bool | None, typer.Option("--log-json/--log-text", help="Log JSON lines.")
        ] = None,
    ) -> None:
        """Feed the inbox from QX_BROKER__URL (nats://, amqp://, redis:// or kafka://) until
        SIGTERM/SIGINT: each message's handler runs once, in its own transaction. With
        QX_BROKER__PARTITIONS, the processes of one --consumer share the partitions, each
        aggregate's events going to one of them at a time."""
        from qx.outbox import InboxService

        async def main() -> None:
            async with _inbox_of(consumer, uow=uow, router=router) as (settings, inbox, routes):
                _configure_service_logging(settings, log_level, log_json)
                if metrics_port is not None:
                    from qx.outbox import InboxMetrics

                    InboxMetrics(inbox).serve(metrics_port)
                service = InboxService(
                    settings.broker,
                    inbox,
                    routes,
                    name=consumer,
                    concurrency=concurrency,
                    lease_seconds=lease_seconds,
                )
                await service.serve(
                    ready=lambda: console.print(
                        f"consuming {settings.broker.url} as {consumer}; SIGTERM or Ctrl-C stops",
                        highlight=False,
                        soft_wrap=True,
                    )
                )

        with _one_line(console):
            asyncio.run(main())

    @inbox.command("parked")
    def parked_command(
        consumer: Annotated[str, typer.Option("--consumer", help="The consumer's name.")],
    ) -> None:
        """List the messages parked at a consumer: each that failed its handler's attempts
        (with its error) and the later events of its aggregate waiting behind it."""

        async def main() -> None:
            async with _inbox_of(consumer) as (_settings, inbox, _routes):
                parked = await inbox.parked()
            for message in parked:
                why = message.error or "behind its aggregate's parked message"
                where = f" {message.aggregate} #{message.sequence}" if message.aggregate else ""
                console.print(
                    f"{message.message_id} {message.event_name}{where}: {why[:300]}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
            console.print(f"{len(parked)} parked", highlight=False)

        with _one_line(console):
            asyncio.run(main())

    @inbox.command("requeue")
    def requeue_command(
        router: Annotated[str, _ROUTER_OPTION],
        uow: Annotated[str, _UOW_OPTION],
        consumer: Annotated[str, typer.Option("--consumer", help="The consumer's name.")],
    ) -> None:
        """Apply the parked messages again, each aggregate's in order, and unpark their
        aggregates; a message that fails again stays parked with its aggregate."""

        async def main() -> None:
            async with _inbox_of(consumer, uow=uow, router=router) as (_s, inbox, routes):
                assert routes is not None
                done = await inbox.requeue(routes.dispatch)
                left = len(await inbox.parked())
            console.print(f"{done} requeued, {left} still parked", highlight=False)
            if left:
                raise typer.Exit(code=1)

        with _one_line(console):
            asyncio.run(main())

    return inbox


@contextlib.asynccontextmanager
async def _inbox_of(
    consumer: str, *, uow: str | None = None, router: str | None = None
) -> AsyncIterator[tuple[Any, Any, Any]]:
    """The settings, the consumer's inbox over ``QX_DB__URL`` (its units of work of class
    ``uow``) and the router ``router`` names, for the ``qx inbox`` commands."""
    from qx._targets import load_target
    from qx.db import UnitOfWork, UnitOfWorkFactory, create_engine, create_session_factory
    from qx.outbox import EventRouter, Inbox
    from qx.settings import load_settings

    settings = load_settings()
    routes = None
    if router is not None:
        routes = load_target(router, what="router", expected=EventRouter, hint="an EventRouter")
    unit: Any = UnitOfWork
    if uow is not None:
        unit = load_target(uow, what="unit of work", expected=type, hint="a UnitOfWork class")
        if not issubclass(unit, UnitOfWork):
            raise ConfigurationError(f"{uow[:200]} is not a UnitOfWork subclass")
    engine = create_engine(settings.db)
    try:
        factory = UnitOfWorkFactory(unit, create_session_factory(engine))
        yield settings, Inbox(factory, consumer=consumer), routes
    finally:
        await engine.dispose()


def _configure_service_logging(settings: Any, level: str | None, json_lines: bool | None) -> None:
    """A long-running command's logging: ``--log-level`` / ``--log-json`` when given, else
    ``QX_RELAY__LOG_LEVEL`` / ``QX_RELAY__LOG_FORMAT``."""
    json_out = settings.relay.log_format == "json" if json_lines is None else json_lines
    _configure_logging(level or settings.relay.log_level, json_lines=json_out)


def _configure_logging(level: str, *, json_lines: bool) -> None:
    """Log to stderr at ``level`` (checked: DEBUG, INFO, WARNING or ERROR)."""
    from qx.outbox._logging import configure_logging

    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise typer.BadParameter(f"not a level: {level!r}", param_hint="--log-level")
    configure_logging(level=level.upper(), json_lines=json_lines)


@contextmanager
def _one_line(
    console: Console, *, what: str = "error", extra: tuple[type[Exception], ...] = ()
) -> Iterator[None]:
    """Turn qx's errors, and driver errors qx can translate, into one line and exit 1 (a
    command-line user wants the mistake, not a traceback). Anything else is a bug: raised."""
    from rich.markup import escape

    from qx.db._translate import translate_error

    expected: tuple[type[Exception], ...] = (QxError, *extra)
    try:
        yield
    except expected as exc:
        # Escaped: messages quote things like qx[api] that rich would read as markup.
        console.print(f"[red]{what}:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    except Exception as exc:
        translated = translate_error(exc)
        if translated is None and not isinstance(exc, OSError):
            raise
        console.print(
            f"[red]cannot reach the database or broker:[/red] {escape(str(translated or exc))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from exc


def _db_app(console: Console) -> typer.Typer:
    db = typer.Typer(help="Database migrations (Alembic, through qx.migrations).")

    def alembic(config: str | None, work: Any) -> Any:
        from alembic.util.exc import CommandError

        from qx.migrations import alembic_config

        with _one_line(console, extra=(CommandError,)):
            return work(alembic_config(config or "alembic.ini"))

    @db.command("upgrade")
    def upgrade_command(
        revision: Annotated[
            str, typer.Argument(help="Target (default: every head, qx's chain and yours).")
        ] = "heads",
        config: Annotated[str | None, _CONFIG_OPTION] = None,
        sql: Annotated[bool, typer.Option("--sql", help="Print the SQL instead.")] = False,
    ) -> None:
        """Upgrade the database (default: every head)."""
        from alembic import command

        alembic(config, lambda cfg: command.upgrade(cfg, revision, sql=sql))

    # "-1" is a relative revision, not an option: let it through as the argument.
    @db.command("downgrade", context_settings={"ignore_unknown_options": True})
    def downgrade_command(
        revision: Annotated[str, typer.Argument(help="Target, e.g. -1 or base.")],
        config: Annotated[str | None, _CONFIG_OPTION] = None,
    ) -> None:
        """Downgrade the database to a revision."""
        from alembic import command

        alembic(config, lambda cfg: command.downgrade(cfg, revision))

    @db.command("revision")
    def revision_command(
        message: Annotated[str, typer.Option("-m", "--message", help="What it changes.")],
        autogenerate: Annotated[
            bool, typer.Option("--autogenerate", help="Compare the metadata with the database.")
        ] = False,
        config: Annotated[str | None, _CONFIG_OPTION] = None,
    ) -> None:
        """Write a new revision on your chain, depending on qx's (with --autogenerate: what
        your metadata adds to a database that `qx db upgrade` brought up to date)."""
        from qx.migrations import new_revision

        alembic(config, lambda cfg: new_revision(cfg, message=message, autogenerate=autogenerate))

    @db.command("history")
    def history_command(config: Annotated[str | None, _CONFIG_OPTION] = None) -> None:
        """List the revisions, newest first."""
        from alembic import command

        alembic(config, lambda cfg: command.history(cfg))

    @db.command("heads")
    def heads_command(config: Annotated[str | None, _CONFIG_OPTION] = None) -> None:
        """Show the head revisions."""
        from alembic import command

        alembic(config, lambda cfg: command.heads(cfg, verbose=True))

    @db.command("show")
    def show_command(
        revision: Annotated[str, typer.Argument()] = "heads",
        config: Annotated[str | None, _CONFIG_OPTION] = None,
    ) -> None:
        """Show one revision."""
        from alembic import command

        alembic(config, lambda cfg: command.show(cfg, revision))

    @db.command("stamp")
    def stamp_command(
        revision: Annotated[str, typer.Argument(help="e.g. head, or a revision id.")],
        config: Annotated[str | None, _CONFIG_OPTION] = None,
    ) -> None:
        """Record a revision as applied without running it."""
        from alembic import command

        alembic(config, lambda cfg: command.stamp(cfg, revision))

    @db.command("merge")
    def merge_command(
        revisions: Annotated[list[str], typer.Argument(help="The heads to join.")],
        message: Annotated[str | None, typer.Option("-m", "--message")] = None,
        config: Annotated[str | None, _CONFIG_OPTION] = None,
    ) -> None:
        """Write a revision joining several heads."""
        from alembic import command

        alembic(config, lambda cfg: command.merge(cfg, revisions, message=message))

    @db.command("current")
    def current_command(config: Annotated[str | None, _CONFIG_OPTION] = None) -> None:
        """Show the database's revision."""
        from alembic import command

        alembic(config, lambda cfg: command.current(cfg))

    @db.command("check")
    def check_command(config: Annotated[str | None, _CONFIG_OPTION] = None) -> None:
        """Exit 1 and list the differences when autogenerate would write a revision."""
        from alembic import command
        from alembic.util.exc import AutogenerateDiffsDetected

        from qx.migrations import describe_difference

        def check(cfg: Any) -> None:
            try:
                command.check(cfg)
            except AutogenerateDiffsDetected as exc:
                console.print("the database schema does not match the code:", highlight=False)
                for diff in exc.diffs:
                    for one in diff if isinstance(diff, list) else [diff]:
                        console.print(f"  - {describe_difference(one)}", highlight=False)
                raise typer.Exit(1) from exc
            console.print("schema is current: autogenerate finds nothing to do")

        alembic(config, check)

    @db.command("init")
    def init_command(
        metadata: Annotated[
            str, typer.Option("--metadata", help="Your MetaData as package.module:attribute.")
        ],
        directory: Annotated[str, typer.Option("--directory", help="Service root.")] = ".",
    ) -> None:
        """Write alembic.ini, migrations/env.py and migrations/script.py.mako."""
        from qx.migrations import init_environment

        try:
            written = init_environment(directory, metadata=metadata)
        except QxError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from exc
        for path in written:
            console.print(f"wrote {path}", highlight=False)
        console.print(
            "next: QX_DB__URL=... qx db upgrade (qx's tables), then "
            'qx db revision --autogenerate -m "initial" (yours)',
            highlight=False,
        )

    return db


def _serve(settings: Any, port: int) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ConfigurationError(
            "qx demo --serve needs the api extra: pip install 'qx[api]'"
        ) from exc

    from qx._demo import run_demo
    from qx.examples.orders.api import create_app

    asyncio.run(run_demo(settings, orders_count=1))  # migrate and stock the catalogue
    uvicorn.run(create_app(settings=settings), host="127.0.0.1", port=port)


def _print_report(console: Console, report: Any) -> None:
    console.print(f"[bold]qx demo[/bold] on {report.database}, broker {report.broker}")
    for title, label, unit, counts in (
        ("Orders by status", "status", "orders", report.orders_by_status),
        (
            "Domain events handled in committed transactions",
            "event",
            "handled",
            report.events_dispatched,
        ),
        ("Commands raced against one order", "outcome", "commands", report.race_outcomes),
    ):
        table = Table(title=title)
        table.add_column(label)
        table.add_column(unit, justify="right")
        for name, count in sorted(counts.items()):
            table.add_row(name, str(count))
        console.print(table)
    outbox = Table(title="Outbox (latest rows)")
    columns = ("position", "event_name", "aggregate_id", "published_at")
    for column in columns:
        outbox.add_column(column)
    for row in report.outbox_rows:
        when = row["published_at"]
        cells = [str(row[c]) for c in columns[:-1]]
        outbox.add_row(*cells, when.strftime("%H:%M:%S.%f")[:-3] if when else "pending")
    console.print(outbox)
    console.print(
        f"placed {report.orders_placed} orders in {report.seconds:.2f}s "
        f"({report.throughput:.0f} orders/s); optimistic-concurrency conflicts retried by "
        f"the bus: {report.retried_conflicts}; outbox rows: {report.outbox_total}, "
        f"published to {report.broker}: {report.published}",
        highlight=False,
    )


def _parse_age(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = text[:-1], text[-1:].lower()
    if unit not in units or not value.isdigit():
        raise typer.BadParameter(f"expected a number and a unit (s, m, h, d), got {text!r}")
    return timedelta(seconds=int(value) * units[unit])


def _outbox_app(console: Console) -> typer.Typer:
    outbox = typer.Typer(help="Outbox relay and maintenance.", no_args_is_help=True)

    def run(work: Any, *, relay: bool = False) -> Any:
        from qx.db import create_engine
        from qx.settings import load_settings

        async def main() -> Any:
            settings = load_settings()
            options: dict[str, Any] = {}
            if relay and settings.db.url.startswith("postgresql"):
                from qx.outbox._store import relay_server_settings

                timeout = settings.relay.db_timeout
                options["connect_args"] = {
                    "server_settings": relay_server_settings(timeout),
                    "timeout": timeout,
                }
            engine = create_engine(settings.db, **options)
            try:
                return await work(settings, engine)
            finally:
                # Closing pooled connections over a dead network would wait forever.
                try:
                    await asyncio.wait_for(engine.dispose(), settings.relay.db_timeout)
                except TimeoutError:
                    await engine.dispose(close=False)

        with _one_line(console):
            return asyncio.run(main())

    @outbox.command("relay")
    def relay_command(
        metrics_port: Annotated[
            int | None, typer.Option("--metrics-port", help="Serve Prometheus /metrics.")
        ] = None,
        log_level: Annotated[
            str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
        ] = None,
        log_json: Annotated[
            bool | None, typer.Option("--log-json/--log-text", help="Log JSON lines.")
        ] = None,
    ) -> None:
        """Publish outbox rows to QX_BROKER__URL until SIGTERM/SIGINT."""
        from qx.outbox import OutboxRelay
        from qx.outbox.publishers import publisher_from_settings

        async def work(settings: Any, engine: Any) -> None:
            _configure_service_logging(settings, log_level, log_json)
            metrics = None
            if metrics_port is not None:
                from qx.outbox import PrometheusMetrics

                metrics = PrometheusMetrics()
                metrics.serve(metrics_port)
            relay = OutboxRelay(
                engine,
                publisher_from_settings(settings.broker),
                settings=settings.relay,
                source=settings.broker.source,
                metrics=metrics,
            )
            await relay.serve(
                ready=lambda: console.print(
                    f"relaying outbox rows to {settings.broker.url}; SIGTERM or Ctrl-C stops",
                    highlight=False,
                    soft_wrap=True,
                )
            )

        run(work, relay=True)

    @outbox.command("status")
    def status_command(
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
        limit: Annotated[int, typer.Option("--limit", help="Dead/parked rows listed.")] = 50,
    ) -> None:
        """Counts (pending, oldest, in retry, dead, parked, published last minute, relays),
        then the dead and parked rows."""
        import json
        from dataclasses import asdict

        from qx.core import utcnow
        from qx.outbox import OutboxStore

        async def work(_settings: Any, engine: Any) -> Any:
            store = OutboxStore(engine)
            return await store.status(now=utcnow()), await store.problems(limit=limit)

        status, problems = run(work)
        if as_json:
            document = {
                "status": asdict(status),
                "rows": [{**asdict(p), "id": str(p.id)} for p in problems],
            }
            sys.stdout.write(json.dumps(document) + "\n")
            return
        table = Table(title="qx_outbox")
        columns = ("pending", "oldest pending", "in retry", "dead", "parked", "published 1 min")
        for column in (*columns, "relays"):
            table.add_column(column, justify="right")
        table.add_row(
            str(status.pending),
            f"{status.oldest_pending_seconds:.1f}s",
            str(status.in_retry),
            str(status.dead),
            str(status.parked),
            str(status.published_last_minute),
            str(status.relays),
        )
        console.print(table)
        if problems:
            rows = Table(title="dead and parked rows")
            for column in ("state", "id", "aggregate", "event", "attempts", "last error"):
                rows.add_column(column)
            for p in problems:
                rows.add_row(
                    p.state,
                    str(p.id),
                    p.aggregate or "",
                    p.event_name,
                    str(p.attempts),
                    (p.last_error or "")[:120],
                )
            console.print(rows)

    @outbox.command("requeue")
    def requeue_command(
        ids: Annotated[list[str] | None, typer.Argument(help="Event ids (default: all).")] = None,
        event_name: Annotated[str | None, typer.Option("--event", help="Only this event.")] = None,
    ) -> None:
        """Revive dead-lettered rows (all, by id, or by event name); the rows parked behind
        them follow in order."""
        from uuid import UUID

        from qx.core import utcnow
        from qx.outbox import OutboxStore

        try:
            parsed = [UUID(i) for i in ids or []]
        except ValueError as exc:
            raise typer.BadParameter(f"not an event id: {exc}") from exc

        async def work(_settings: Any, engine: Any) -> int:
            return await OutboxStore(engine).requeue(
                now=utcnow(), ids=parsed or None, event_name=event_name
            )

        console.print(f"requeued {run(work)} dead row(s)")

    @outbox.command("purge")
    def purge_command(
        older_than: Annotated[
            str, typer.Option("--older-than", help="Age such as 7d, 12h, 30m.")
        ] = "7d",
    ) -> None:
        """Delete published rows older than the given age."""
        from qx.core import utcnow
        from qx.outbox import OutboxStore

        age = _parse_age(older_than)

        async def work(settings: Any, engine: Any) -> int:
            return await OutboxStore(engine).purge(
                older_than=utcnow() - age, batch_size=settings.relay.purge_batch
            )

        console.print(f"purged {run(work)} published row(s)")

    return outbox


def main() -> None:
    """Entry point of the ``qx`` script."""
    if typer is None:  # pragma: no cover
        sys.exit("the qx command needs the cli extra: pip install 'qx[cli]'")
    _build_app()()


app = _build_app() if typer is not None else None
