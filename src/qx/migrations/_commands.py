"""Running Alembic from code that already has an engine and an event loop.

``alembic upgrade head`` runs ``env.py``, which starts its own event loop; an application or a
test that is inside one cannot do that. These helpers open a connection on the caller's
engine and hand it to Alembic (``config.attributes["connection"]``), which
:func:`qx.migrations.run_migrations` then uses.

Example:
    >>> await upgrade(engine)                       # doctest: +SKIP  (qx's own migrations)
    >>> await upgrade(engine, config=alembic_config("alembic.ini"))   # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core._errors import ConfigurationError

__all__ = ["alembic_config", "current", "downgrade", "project_migrations", "stamp", "upgrade"]

T = TypeVar("T")


def project_migrations() -> Path:
    """The directory of qx's own migrations (qx's tables and the orders example).

    In a wheel they are packaged as ``qx/_migrations``; in a source checkout they are the
    repository's ``migrations/``.
    """
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parent.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("qx's migrations are not installed with this copy of qx")


def alembic_config(location: str | Path | None = None, *, url: str | None = None) -> Config:
    """An Alembic ``Config`` for ``alembic.ini`` (or a migrations directory holding one).

    Args:
        location: ``alembic.ini``, or a directory with ``alembic.ini`` or ``env.py``;
            default: qx's own migrations.
        url: the database URL, overriding ``sqlalchemy.url`` and ``QX_DB__URL``.

    Raises:
        ConfigurationError: nothing usable at ``location``.
    """
    path = Path(location) if location is not None else project_migrations()
    if path.is_dir():
        ini = path / "alembic.ini"
        if ini.is_file():
            config = Config(str(ini), stdout=sys.stdout)
        elif (path / "env.py").is_file():
            config = Config(stdout=sys.stdout)
            config.set_main_option("script_location", str(path))
        else:
            raise ConfigurationError(f"{path} holds neither alembic.ini nor env.py")
    elif path.is_file():
        config = Config(str(path), stdout=sys.stdout)
    else:
        raise ConfigurationError(f"no Alembic configuration at {path}; run `qx db init`")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def _on_connection(engine: AsyncEngine, config: Config, work: Callable[[Config], T]) -> T:
    def run(connection: Connection) -> T:
        config.attributes["connection"] = connection
        try:
            return work(config)
        finally:
            config.attributes.pop("connection", None)

    async with engine.begin() as connection:
        return await connection.run_sync(run)


async def upgrade(
    engine: AsyncEngine, revision: str = "head", *, config: Config | None = None
) -> None:
    """``alembic upgrade`` on ``engine`` (default: qx's own migrations to head)."""
    cfg = config or alembic_config()
    await _on_connection(engine, cfg, lambda c: command.upgrade(c, revision))


async def downgrade(
    engine: AsyncEngine, revision: str = "base", *, config: Config | None = None
) -> None:
    """``alembic downgrade`` on ``engine``."""
    cfg = config or alembic_config()
    await _on_connection(engine, cfg, lambda c: command.downgrade(c, revision))


async def stamp(
    engine: AsyncEngine, revision: str = "head", *, config: Config | None = None
) -> None:
    """``alembic stamp``: record ``revision`` without running migrations."""
    cfg = config or alembic_config()
    await _on_connection(engine, cfg, lambda c: command.stamp(c, revision))


async def current(engine: AsyncEngine, *, version_table_schema: str | None = None) -> str | None:
    """The revision the database is at (``None`` before the first migration)."""

    def read(connection: Connection) -> str | None:
        opts: dict[str, Any] = {}
        if version_table_schema is not None:
            opts["version_table_schema"] = version_table_schema
        heads = MigrationContext.configure(connection, opts=opts).get_current_heads()
        return ",".join(heads) if heads else None

    async with engine.connect() as connection:
        return await connection.run_sync(read)
