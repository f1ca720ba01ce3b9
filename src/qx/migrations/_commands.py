"""Running Alembic from code that already has an engine and an event loop.

``alembic upgrade head`` runs ``env.py``, which starts its own event loop; an application or a
test that is inside one cannot do that. These helpers open a connection on the caller's
engine and hand it to Alembic (``config.attributes["connection"]``), which
:func:`qx.migrations.run_migrations` then uses.

qx's tables come as their own chain of revisions, the branch ``qx``, shipped in the package
(``qx.migrations:versions``). A service lists that location beside its own versions in
``alembic.ini``; its own first revision depends on qx's head, so a later qx release brings its
schema change as a new qx revision, applied by the next ``upgrade`` with no edit of the
service's revisions.

Example:
    >>> await upgrade(engine)                       # doctest: +SKIP  (qx's tables only)
    >>> await upgrade(engine, config=alembic_config("alembic.ini"))   # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from qx.core._errors import ConfigurationError
from qx.migrations._placement import QX_VERSIONS, placement, qx_versions

__all__ = [
    "QX_BRANCH",
    "QX_VERSIONS",
    "alembic_config",
    "current",
    "downgrade",
    "new_revision",
    "project_migrations",
    "stamp",
    "upgrade",
]

QX_BRANCH = "qx"
"""The branch label of qx's chain (``qx db upgrade qx@head`` upgrades qx's tables alone)."""

T = TypeVar("T")


def project_migrations() -> Path:
    """The Alembic environment of qx's own chain (qx's tables only, branch ``qx``)."""
    location = Path(__file__).resolve().parent / "environment"
    if not (location / "env.py").is_file():
        raise ConfigurationError("qx's migrations are not installed with this copy of qx")
    return location


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
    own = project_migrations() if location is None else None
    if own is not None or _is_own(path):
        # qx's own environment: its alembic.ini names ``versions/`` beside it, as in the
        # repository's top-level ``migrations/``; installed, the revisions are the package's
        # ``qx/migrations/versions`` beside ``environment/``.
        config.set_main_option("version_locations", str(qx_versions()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _is_own(path: Path) -> bool:
    own = Path(__file__).resolve().parent / "environment"
    candidate = path.absolute()
    return candidate in (own, own / "alembic.ini")


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
    engine: AsyncEngine, revision: str = "heads", *, config: Config | None = None
) -> None:
    """``alembic upgrade`` on ``engine`` (default: qx's own chain, every head).

    A database migrated by the single chain of an earlier qx (revisions ``0001``-``0006``,
    qx's tables and the orders example's together) is first re-stamped with the matching
    revisions of the chains ``config`` knows.
    """
    cfg = config or alembic_config()

    def run(c: Config) -> None:
        _adopt_single_chain(c)
        command.upgrade(c, revision)

    await _on_connection(engine, cfg, run)


#: Revisions of the single chain before qx's tables became their own branch, and the
#: revisions of the qx and orders chains holding the same tables.
_SINGLE_CHAIN = {
    "0001": ("qx_0001", None),
    "0002": ("qx_0001", "orders_0001"),
    "0003": ("qx_0002", "orders_0001"),
    "0004": ("qx_0002", "orders_0002"),
    "0005": ("qx_0003", "orders_0002"),
    "0006": ("qx_0004", "orders_0002"),
}


def _adopt_single_chain(config: Config) -> None:
    schema = config.get_main_option("version_table_schema") or None
    heads = _current_heads(config.attributes["connection"], schema)
    if len(heads) != 1 or heads[0] not in _SINGLE_CHAIN:
        return
    script = ScriptDirectory.from_config(config)
    known = {rev.revision for rev in script.walk_revisions()}
    if heads[0] in known:  # a chain of the caller's that uses the same ids
        return
    command.stamp(config, [rev for rev in _SINGLE_CHAIN[heads[0]] if rev in known], purge=True)


async def downgrade(
    engine: AsyncEngine, revision: str = "base", *, config: Config | None = None
) -> None:
    """``alembic downgrade`` on ``engine``."""
    cfg = config or alembic_config()
    await _on_connection(engine, cfg, lambda c: command.downgrade(c, revision))


async def stamp(
    engine: AsyncEngine,
    revision: str | Sequence[str] = "heads",
    *,
    config: Config | None = None,
    purge: bool = False,
) -> None:
    """``alembic stamp``: record ``revision`` without running migrations (``purge``: forget
    what the version table held first)."""
    cfg = config or alembic_config()
    targets = revision if isinstance(revision, str) else list(revision)
    await _on_connection(engine, cfg, lambda c: command.stamp(c, targets, purge=purge))


async def current(engine: AsyncEngine, *, version_table_schema: str | None = None) -> str | None:
    """The revision the database is at (``None`` before the first migration)."""

    def read(connection: Connection) -> str | None:
        heads = _current_heads(connection, version_table_schema)
        return ",".join(heads) if heads else None

    async with engine.connect() as connection:
        return await connection.run_sync(read)


def _current_heads(connection: Connection, version_table_schema: str | None) -> tuple[str, ...]:
    opts = {"version_table_schema": version_table_schema} if version_table_schema else {}
    return tuple(MigrationContext.configure(connection, opts=opts).get_current_heads())


def new_revision(
    config: Config,
    *,
    message: str,
    autogenerate: bool = False,
    rev_id: str | None = None,
) -> Script | None:
    """``alembic revision`` for a service whose versions sit beside qx's chain.

    The new revision goes on the service's own head (its first one starts a new root in the
    service's versions directory), and depends on qx's head when the service's chain does not
    already: the service's tables are created after qx's, and a qx revision released later
    is simply another head that ``upgrade heads`` applies. Where ``alembic.ini`` does not list
    qx's versions, this is plain ``alembic revision``.

    Raises:
        ConfigurationError: the service's own chain has several heads (merge them first), or
            ``autogenerate`` against a database that ``upgrade`` has not brought to every head.
    """
    script = ScriptDirectory.from_config(config)
    if autogenerate:
        _require_up_to_date(config, script)
    placement(script)  # several heads of the service's own: say so before writing anything
    # The service's env.py places the revision (qx.migrations._placement): the same rule as
    # plain `alembic revision`, which runs it too under revision_environment.
    config.set_main_option("revision_environment", "true")
    return _revision(config, message, autogenerate, rev_id)


def _require_up_to_date(config: Config, script: ScriptDirectory) -> None:
    """Autogenerate compares the metadata with the database; against one that is behind it
    would write qx's tables (or your earlier revisions) into the new revision again."""
    applied: set[str] = set()

    def read(current: tuple[str, ...], _context: Any) -> list[Any]:
        # What the version table holds, and everything below it (dependencies included: a
        # service's revision that depends on qx's head stands for it in the table).
        applied.update(rev.revision for rev in script.iterate_revisions(current, "base"))
        return []

    with EnvironmentContext(config, script, fn=read, dont_mutate=True):
        script.run_env()
    missing = [head for head in script.get_heads() if head not in applied]
    if missing:
        raise ConfigurationError(
            f"the database is behind the migrations (heads not applied: {', '.join(missing)}); "
            "run `qx db upgrade` first, so autogenerate writes only what your metadata adds"
        )


def _revision(
    config: Config, message: str, autogenerate: bool, rev_id: str | None, **where: Any
) -> Script | None:
    made = command.revision(
        config, message=message, autogenerate=autogenerate, rev_id=rev_id, **where
    )
    return made[0] if isinstance(made, list) else made
