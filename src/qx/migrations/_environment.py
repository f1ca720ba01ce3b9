"""What an Alembic ``env.py`` needs, in one call: :func:`run_migrations`.

A service's ``env.py`` becomes::

    from alembic import context
    from qx.migrations import load_metadata, run_migrations

    run_migrations(context, load_metadata("myservice.infrastructure:metadata"))

It handles every mode correctly:

* **offline** (``alembic upgrade head --sql``): URL from settings, literal binds;
* **online**: an async engine from settings with ``NullPool``, migrations run through
  ``connection.run_sync``;
* **shared connection**: a connection passed in ``config.attributes["connection"]`` is used as
  is, so code that already runs an event loop (tests, an app migrating on start-up) calls
  ``command.upgrade`` inside ``connection.run_sync`` instead of ``asyncio.run`` failing.

It also turns on ``render_as_batch`` for SQLite (ALTER support), ``compare_type`` and
``compare_server_default`` (with qx's portable types compared by what they render), keeps the
metadata's naming conventions, adds qx's own tables (``QX_TABLES``: the outbox with its
lanes, relays and sequences, the inbox, idempotency keys) to the target metadata, leaves
alone the tables the metadata does not define (another service's, in a shared database), and
can keep the version table in a given schema. It refuses to guess a database: with no URL in
the settings or ``alembic.ini`` it stops instead of creating a SQLite file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, MetaData, pool
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeDecorator, TypeEngine

from qx._schema import include_qx_tables
from qx._targets import load_target
from qx.core._errors import ConfigurationError
from qx.db._dialect import dialect_named
from qx.db._engine import create_engine, parse_database_url
from qx.migrations._placement import place_new_revisions
from qx.outbox._logging import configured_by_qx
from qx.settings import DatabaseSettings, load_settings

__all__ = [
    "compare_type",
    "configure_context",
    "known_tables_only",
    "load_metadata",
    "render_item",
    "run_migrations",
]


def load_metadata(target: str) -> MetaData:
    """Import ``"package.module:attribute"`` and return it, checked to be a ``MetaData``.

    Raises:
        ConfigurationError: a malformed target, a module that does not import, or an
            attribute that is missing or not a ``MetaData`` (the message names which).
    """
    found: MetaData = load_target(
        target,
        what="metadata",
        expected=MetaData,
        hint="a sqlalchemy MetaData (qx.db.make_metadata())",
    )
    return found


def known_tables_only(metadata: MetaData) -> Callable[..., bool]:
    """An ``include_object`` hook that ignores database tables ``metadata`` does not define.

    A database shared with other services (or holding test tables) is compared only on the
    tables this service owns; Alembic's default would propose dropping the others.
    """
    known = set(metadata.tables)

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, _c: Any) -> bool:
        if type_ == "table" and reflected:
            key = f"{obj.schema}.{obj.name}" if obj.schema else str(obj.name)
            return key in known
        return True

    return include_object


def compare_type(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected_type: TypeEngine[Any],
    metadata_type: TypeEngine[Any],
) -> bool | None:
    """Compare a qx type decorator by the type it renders on this dialect.

    ``UtcDateTime`` is ``TIMESTAMP WITH TIME ZONE``; ``PortableJSON`` is ``JSONB`` on
    PostgreSQL. Returns ``None`` (Alembic's own comparison) for every other type.
    """
    if not isinstance(metadata_type, TypeDecorator):
        return None
    dialect = context.dialect
    rendered = metadata_type.dialect_impl(dialect)
    if isinstance(rendered, TypeDecorator):
        rendered = rendered.load_dialect_impl(dialect)
    ours = rendered.compile(dialect=dialect).upper()
    theirs = inspected_type.compile(dialect=dialect).upper()
    return _normalise(ours) != _normalise(theirs)


def _normalise(text: str) -> str:
    aliases = {"TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ", "DATETIME": "TIMESTAMP"}
    text = " ".join(text.split())
    return aliases.get(text, text)


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render qx's column types in generated revisions as importable ``qx.db.types``."""
    if type_ != "type":
        return False
    if isinstance(obj, TypeDecorator) and type(obj).__module__ == "qx.db.types":
        autogen_context.imports.add("import qx.db.types")
        return f"qx.db.types.{type(obj).__name__}()"
    variants = getattr(obj, "_variant_mapping", None) or {}
    if isinstance(obj, JSON) and isinstance(variants.get("postgresql"), JSONB):
        autogen_context.imports.add("import qx.db.types")
        return "qx.db.types.PortableJSON()"
    return False


def configure_context(
    context: Any,
    metadata: MetaData,
    *,
    dialect_name: str,
    version_table_schema: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The ``context.configure`` options qx uses (shared by every mode and by the drift check)."""
    own = options.pop("process_revision_directives", None)

    def place(migration_context: Any, revision: Any, directives: Any) -> None:
        if own is not None:
            own(migration_context, revision, directives)
        place_new_revisions(migration_context, revision, directives)

    return {
        "process_revision_directives": place,
        "target_metadata": metadata,
        "render_as_batch": dialect_named(dialect_name).batch_migrations,
        "compare_type": compare_type,
        "compare_server_default": True,
        "render_item": render_item,
        "include_object": known_tables_only(metadata),
        "version_table_schema": version_table_schema,
        **options,
    }


def run_migrations(
    context: Any,
    metadata: MetaData,
    *,
    settings: DatabaseSettings | None = None,
    include_qx: bool = True,
    version_table_schema: str | None = None,
    **configure: Any,
) -> None:
    """Run the migrations of an Alembic ``env.py`` in whatever mode Alembic asked for.

    Args:
        context: ``alembic.context``.
        metadata: the service's metadata (naming conventions kept).
        settings: database settings; default: ``QX_DB__*`` from the environment, or the
            ``sqlalchemy.url`` of ``alembic.ini`` when set.
        include_qx: add qx's own tables (``QX_TABLES``) to the target metadata.
        version_table_schema: keep ``alembic_version`` in this schema (or set
            ``version_table_schema`` in ``alembic.ini``).
        **configure: more ``context.configure`` options.

    Raises:
        ConfigurationError: no database URL in ``settings``, ``QX_DB__URL`` (or ``.env``) or
            ``alembic.ini``, or one qx cannot use.
    """
    if include_qx:
        include_qx_tables(metadata)
    config = context.config
    if version_table_schema is None:
        version_table_schema = config.get_main_option("version_table_schema") or None
    shared = config.attributes.get("connection")
    if (
        shared is None
        and config.config_file_name
        and Path(config.config_file_name).is_file()
        and config.file_config.has_section("loggers")
        and not configured_by_qx()
    ):
        # The command line's logging, as alembic.ini configures it (not when embedded).
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if shared is not None:
        _run_on(context, metadata, shared, version_table_schema, configure)
        return
    revising = _revision_context(context)
    if revising is not None and not revising.command_args.get("autogenerate"):
        # A revision written by hand needs no database: run the hooks (which place it in the
        # service's folder) against the dialect alone.
        url = _url_if_any(config, settings)
        context.configure(
            dialect_name=url.get_backend_name() if url is not None else "sqlite",
            **configure_context(
                context,
                metadata,
                dialect_name=url.get_backend_name() if url is not None else "sqlite",
                version_table_schema=version_table_schema,
                **configure,
            ),
        )
        # What the revision command's own callback does, without the database it would
        # read the current heads from (a new revision does not depend on them).
        revising.run_no_autogenerate((), context.get_context())
        return
    db = _settings(config, settings)
    if context.is_offline_mode():
        url = parse_database_url(db.url)
        context.configure(
            url=url,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
            **configure_context(
                context,
                metadata,
                dialect_name=url.get_backend_name(),
                version_table_schema=version_table_schema,
                **configure,
            ),
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_online(context, metadata, db, version_table_schema, configure))


def _revision_context(context: Any) -> Any:
    """Alembic's revision context when ``context`` runs for ``alembic revision`` (the
    ``alembic.context`` module proxies the running ``EnvironmentContext``)."""
    environment = getattr(context, "_proxy", None) or context
    return getattr(environment, "context_opts", {}).get("revision_context")


def _url_if_any(config: Any, settings: DatabaseSettings | None) -> Any:
    """The database URL when one is configured (``None`` when none is)."""
    try:
        return parse_database_url(_settings(config, settings).url)
    except ConfigurationError:
        return None


def _settings(config: Any, settings: DatabaseSettings | None) -> DatabaseSettings:
    if settings is not None:
        return settings
    ini_url = config.get_main_option("sqlalchemy.url")
    loaded = load_settings().db
    if "url" in loaded.model_fields_set:  # QX_DB__URL, from the environment or .env
        return loaded
    if ini_url:
        return loaded.model_copy(update={"url": ini_url})
    # The settings' default (a SQLite file in the working directory) suits the demo; a
    # migration run against it would quietly create and migrate a stray database.
    raise ConfigurationError(
        "no database to migrate: set QX_DB__URL (e.g. postgresql+asyncpg://user@host/db or "
        "sqlite+aiosqlite:///service.sqlite3), or sqlalchemy.url in alembic.ini"
    )


async def _run_online(
    context: Any,
    metadata: MetaData,
    db: DatabaseSettings,
    version_table_schema: str | None,
    configure: dict[str, Any],
) -> None:
    engine = create_engine(db, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(
                _run_on_sync(context, metadata, version_table_schema, configure)
            )
    except OSError as exc:
        raise ConfigurationError(f"cannot reach the database at {engine.url!r}: {exc}") from exc
    finally:
        await engine.dispose()


def _run_on(
    context: Any,
    metadata: MetaData,
    connection: Any,
    version_table_schema: str | None,
    configure: dict[str, Any],
) -> None:
    if isinstance(connection, AsyncConnection):
        raise ConfigurationError(
            'config.attributes["connection"] must be a sync Connection: call '
            "command.upgrade(...) inside `await async_connection.run_sync(...)`"
        )
    if not isinstance(connection, Connection):
        raise ConfigurationError(
            f'config.attributes["connection"] is {type(connection).__name__}, not a Connection'
        )
    _run_on_sync(context, metadata, version_table_schema, configure)(connection)


def _run_on_sync(
    context: Any,
    metadata: MetaData,
    version_table_schema: str | None,
    configure: dict[str, Any],
) -> Callable[[Connection], None]:
    def run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            **configure_context(
                context,
                metadata,
                dialect_name=connection.dialect.name,
                version_table_schema=version_table_schema,
                **configure,
            ),
        )
        with context.begin_transaction():
            context.run_migrations()

    return run
