"""Alembic environment of the orders example: its tables, and qx's (from qx's chain)."""

from alembic import context

from qx.examples.orders.infrastructure import metadata
from qx.migrations import run_migrations

run_migrations(context, metadata)
