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

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.pool import NullPool, StaticPool

from qx.core._errors import ConfigurationError
from qx.db._dialect import BACKENDS, dialect_named
from qx.db._session import QxSession
from qx.settings import DatabaseSettings, QxSettings

__all__ = ["create_engine", "create_session_factory", "parse_database_url"]

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
    if backend not in BACKENDS:
        raise ConfigurationError(
            f"unsupported database {raw_backend!r} in URL "
            f"{parsed.render_as_string(hide_password=True)!r}: qx supports "
            "postgresql+asyncpg and sqlite+aiosqlite"
        )
    dialect = dialect_named(backend)
    driver, extra = dialect.driver, dialect.extra
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
    dialect = dialect_named(parsed.get_backend_name())
    kwargs: dict[str, Any] = {"echo": db.echo, **dialect.engine_options(db, parsed)}
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
    dialect.prepare_engine(engine, db, parsed)
    return engine


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
