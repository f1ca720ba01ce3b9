"""Alembic environment of qx's own chain: qx's tables only (branch ``qx``).

A service does not run this environment: its own ``alembic.ini`` lists qx's versions
(``qx.migrations:versions``) beside its own, and its ``env.py`` runs both chains.
"""

from alembic import context
from sqlalchemy import MetaData

from qx.db import make_metadata
from qx.migrations import run_migrations

metadata: MetaData = make_metadata()
run_migrations(context, metadata)
