"""Engine and session factory construction from settings.

Only ``postgresql+asyncpg`` and ``sqlite+aiosqlite`` are supported; ``postgresql://`` and
``sqlite://`` are upgraded to those drivers. Nothing connects until first use.

Example:
    >>> from qx.settings import DatabaseSettings
    >>> engine = create_engine(DatabaseSettings(url="sqlite+aiosqlite:///:memory:"))
    >>> engine.dialect.name
    'sqlite'
"""

from __future__ import annotations

import importlib.util
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, StaticPool

from qx.core._errors import ConfigurationError
from qx.db._dialect import install_asyncpg_codecs, sqlite_fold
from qx.db._session import QxSession
from qx.settings import DatabaseSettings, QxSettings

__all__ = ["create_engine", "create_session_factory", "parse_database_url"]

_DRIVERS: Final[dict[str, tuple[str, str]]] = {
    # backend → (driver, extra that installs it)
    "postgresql": ("asyncpg", "postgres"),
    "sqlite": ("aiosqlite", "sqlite"),
}
_ALIASES: Final[dict[str, str]] = {"postgres": "postgresql", "postgresql": "postgresql"}


def parse_database_url(url: str | URL) -> URL:
    """Parse, normalise and check a database URL.

    Raises:
        ConfigurationError: the URL is malformed, names an unsupported backend or driver, or
            the driver is not installed.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(f"invalid database URL {url!r}: {exc}") from exc
    # Read the backend from the raw drivername: get_backend_name() loads the dialect, and
    # SQLAlchemy has no dialect named "postgres" (Heroku-style URLs use it).
    raw_backend = parsed.drivername.split("+", 1)[0]
    backend = _ALIASES.get(raw_backend, raw_backend)
    if backend not in _DRIVERS:
        raise ConfigurationError(
            f"unsupported database {raw_backend!r} in URL "
            f"{parsed.render_as_string(hide_password=True)!r}: qx supports "
            "postgresql+asyncpg and sqlite+aiosqlite"
        )
    driver, extra = _DRIVERS[backend]
    given = parsed.drivername.split("+", 1)[1] if "+" in parsed.drivername else driver
    if given != driver:
        raise ConfigurationError(
            f"unsupported driver {given!r} for {backend}: qx needs the async driver "
            f"'{backend}+{driver}'"
        )
    if importlib.util.find_spec(driver) is None:
        raise ConfigurationError(f"the {driver} driver is not installed: pip install 'qx[{extra}]'")
    return parsed.set(drivername=f"{backend}+{driver}")


def _settings(settings: DatabaseSettings | QxSettings | None) -> DatabaseSettings:
    if settings is None:
        return QxSettings().db
    if isinstance(settings, QxSettings):
        return settings.db
    return settings


def create_engine(
    settings: DatabaseSettings | QxSettings | None = None,
    *,
    url: str | URL | None = None,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """Create an ``AsyncEngine`` configured for qx from settings.

    PostgreSQL gets the pool settings, ``statement_timeout`` (applied per connection, so
    slow statements are cancelled by the server and surface as ``StatementTimeout``) and an
    ``application_name``. SQLite gets foreign keys on, WAL for files, a busy timeout, and
    transactions begun by qx so that SAVEPOINTs and write locking behave.

    Args:
        settings: database settings (``QxSettings`` or ``DatabaseSettings``); read from the
            environment when omitted.
        url: overrides ``settings.url``.
        **engine_kwargs: passed to SQLAlchemy's ``create_async_engine``.

    Raises:
        ConfigurationError: the URL or driver is not supported.
    """
    db = _settings(settings)
    parsed = parse_database_url(url if url is not None else db.url)
    kwargs: dict[str, Any] = {"echo": db.echo}
    if parsed.get_backend_name() == "postgresql":
        server_settings = {"application_name": "qx"}
        if db.statement_timeout is not None:
            server_settings["statement_timeout"] = str(int(db.statement_timeout * 1000))
        if db.search_path is not None:
            server_settings["search_path"] = db.search_path
        kwargs.update(
            pool_size=db.pool_size,
            max_overflow=db.max_overflow,
            pool_timeout=db.pool_timeout,
            pool_recycle=db.pool_recycle,
            pool_pre_ping=db.pool_pre_ping,
            connect_args={"server_settings": server_settings},
        )
    elif _in_memory(parsed):
        # The database lives in its one connection, so there is exactly one, handed to one
        # unit of work at a time: the others wait for it (pool_timeout) rather than share
        # its transaction, as StaticPool would - a concurrent reader's rollback would then
        # undo a writer's flushed rows.
        kwargs.update(
            poolclass=AsyncAdaptedQueuePool,
            pool_size=1,
            max_overflow=0,
            pool_timeout=db.pool_timeout,
            pool_recycle=-1,
        )
    else:
        kwargs.update(pool_pre_ping=db.pool_pre_ping, pool_timeout=db.pool_timeout)
    extra_connect_args = engine_kwargs.pop("connect_args", None)
    if engine_kwargs.get("poolclass") in (NullPool, StaticPool):
        # Pools without a size (migrations use NullPool) refuse the sizing options.
        for key in ("pool_size", "max_overflow", "pool_timeout"):
            kwargs.pop(key, None)
    kwargs.update(engine_kwargs)
    if extra_connect_args:
        # Merge, never replace: a caller's search_path must not drop qx's statement_timeout.
        merged = dict(kwargs.get("connect_args", {}))
        extra = dict(extra_connect_args)
        if "server_settings" in extra and "server_settings" in merged:
            extra["server_settings"] = {**merged["server_settings"], **extra["server_settings"]}
        merged.update(extra)
        kwargs["connect_args"] = merged
    engine = _create_async_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "postgresql":
        event.listen(engine.sync_engine, "connect", _on_pg_connect)
    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine, db, in_memory=_in_memory(parsed))
    return engine


def _on_pg_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.run_async(install_asyncpg_codecs)


def _in_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _configure_sqlite(engine: AsyncEngine, db: DatabaseSettings, *, in_memory: bool) -> None:
    begin = "BEGIN IMMEDIATE" if db.sqlite_begin == "immediate" else "BEGIN"
    busy_ms = int(db.sqlite_busy_timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite's legacy implicit transactions, decide when to BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            # LIKE is case-insensitive in SQLite by default; PostgreSQL's is not. qx's
            # contains/startswith/endswith must mean the same on both.
            cursor.execute("PRAGMA case_sensitive_like=ON")
            # Case-insensitive lookups fold both sides with Python's rules (Dialect.fold).
            dbapi_connection.create_function("qx_fold", 1, sqlite_fold, deterministic=True)
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)


#: How qx's sessions are made: objects stay usable after commit (``expire_on_commit=False``:
#: touching an expired attribute in asyncio raises ``MissingGreenlet``), and the session class
#: carries qx's scoping, tracking and versioning hooks (:class:`qx.db.QxSession`).
SESSION_OPTIONS: Final[dict[str, Any]] = {
    "expire_on_commit": False,
    "sync_session_class": QxSession,
}


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Return the session factory units of work use (see :data:`SESSION_OPTIONS`)."""
    return async_sessionmaker(engine, **SESSION_OPTIONS)
