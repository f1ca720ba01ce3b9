"""The ``qx`` command line (needs the ``cli`` extra: ``pip install 'qx[cli]'``)."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

from qx.core.errors import QxError

try:
    import typer
    from rich.console import Console
    from rich.table import Table
except ImportError:  # pragma: no cover - exercised only without the extra
    typer = None  # type: ignore[assignment]

__all__ = ["app", "main"]


def _build_app() -> typer.Typer:
    app = typer.Typer(
        help="qx: persistence toolkit for async Python services.", no_args_is_help=True
    )
    console = Console()

    @app.callback()
    def _root() -> None:
        """qx command line."""

    @app.command()
    def demo(
        orders: Annotated[
            int, typer.Option("--orders", min=1, max=10_000, help="Orders to place.")
        ] = 5,
    ) -> None:
        """Run the orders example on QX_DB__URL (default: SQLite file ./qx.sqlite3)."""
        from qx.demo import run_demo
        from qx.settings import load_settings

        try:
            settings = load_settings()
            report = asyncio.run(run_demo(settings, orders_count=orders))
        except QxError as exc:
            console.print(f"[red]qx demo failed:[/red] {exc}")
            raise typer.Exit(1) from exc
        console.print(f"[bold]qx demo[/bold] on {report.database}")
        events = Table(title="Domain events dispatched inside the transactions")
        events.add_column("event")
        events.add_column("handled", justify="right")
        for name, count in sorted(report.events_dispatched.items()):
            events.add_row(name, str(count))
        console.print(events)
        outbox = Table(title="Outbox rows written in the same commits (latest)")
        columns = ("position", "event_name", "aggregate_id", "correlation_id")
        for column in columns:
            outbox.add_column(column)
        for row in report.outbox_rows:
            outbox.add_row(*(str(row[c]) for c in columns))
        console.print(outbox)
        statuses = ", ".join(f"{k}={v}" for k, v in sorted(report.orders_by_status.items()))
        console.print(
            f"placed {report.orders_placed} orders; orders by status: {statuses}; "
            f"outbox rows in total: {report.outbox_total}; took {report.seconds:.2f}s"
        )

    return app


def main() -> None:
    """Entry point of the ``qx`` script."""
    if typer is None:  # pragma: no cover
        sys.exit("the qx command needs the cli extra: pip install 'qx[cli]'")
    _build_app()()


app = _build_app() if typer is not None else None
