"""Alembic environment of qx's own migrations: qx's tables and the orders example's."""

from alembic import context

from qx.examples.orders.infrastructure import metadata
from qx.migrations import run_migrations

run_migrations(context, metadata)
