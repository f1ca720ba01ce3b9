"""Alembic integration: the ``env.py`` helper, programmatic upgrades, drift checks.

Example:
    >>> # env.py
    >>> from alembic import context                                  # doctest: +SKIP
    >>> from qx.migrations import run_migrations                      # doctest: +SKIP
    >>> run_migrations(context, metadata)                             # doctest: +SKIP

Importing this package registers ``op.create_outbox_notify`` / ``op.drop_outbox_notify`` with
Alembic and the comparator that makes autogenerate write them (see
:mod:`qx.migrations._trigger`).
"""

from qx.migrations._commands import (
    QX_BRANCH,
    QX_VERSIONS,
    alembic_config,
    current,
    downgrade,
    new_revision,
    project_migrations,
    stamp,
    upgrade,
)
from qx.migrations._drift import assert_schema_current, describe_difference, schema_differences
from qx.migrations._environment import (
    compare_type,
    configure_context,
    known_tables_only,
    load_metadata,
    render_item,
    run_migrations,
)
from qx.migrations._scaffold import init_environment
from qx.migrations._trigger import CreateOutboxNotifyOp, DropOutboxNotifyOp

__all__ = [
    "QX_BRANCH",
    "QX_VERSIONS",
    "CreateOutboxNotifyOp",
    "DropOutboxNotifyOp",
    "alembic_config",
    "assert_schema_current",
    "compare_type",
    "configure_context",
    "current",
    "describe_difference",
    "downgrade",
    "init_environment",
    "known_tables_only",
    "load_metadata",
    "new_revision",
    "project_migrations",
    "render_item",
    "run_migrations",
    "schema_differences",
    "stamp",
    "upgrade",
]
