"""Alembic environment of the example project, locked by alembic-sgp-lock."""

import os
from logging.config import fileConfig

from alembic import context

import alembic_sgp_lock

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)

# DATABASE_URL, when set, replaces sqlalchemy.url from alembic.ini.
alembic_sgp_lock.run_migrations(
    target_metadata=None,
    url=os.environ.get("DATABASE_URL") or None,
)
