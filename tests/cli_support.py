"""Helpers for tests of the pre-flight checks and the ``alembic-sgp-lock`` command."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.support import Project

CONSOLE_SCRIPT = Path(sys.executable).with_name("alembic-sgp-lock")

# An env.py without the plugin, as `alembic init` writes it, reduced to online mode.
PLAIN_ENV = '''\
"""A stock env.py that does not use alembic-sgp-lock."""

import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)

engine = sa.create_engine(os.environ["DATABASE_URL"], poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
'''

# The example env.py with the version table taken from the environment.
CONFIGURED_ENV = '''\
"""The hook with a configured version table."""

import os
from logging.config import fileConfig

from alembic import context

import alembic_sgp_lock

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)

alembic_sgp_lock.run_migrations(
    url=os.environ["DATABASE_URL"],
    version_table=os.environ.get("TEST_VERSION_TABLE", "alembic_version"),
    version_table_schema=os.environ.get("TEST_VERSION_TABLE_SCHEMA") or None,
)
'''


def use_env(project: Project, text: str) -> None:
    """Replace the project's env.py."""
    (project.path / "migrations" / "env.py").write_text(textwrap.dedent(text))


def run_cli(
    project: Project, *arguments: str, timeout: float = 120, **settings: str
) -> CliFinished:
    """Run ``alembic-sgp-lock -c alembic.ini ARGUMENTS`` to the end, stdout and stderr apart."""
    completed = subprocess.run(
        [str(CONSOLE_SCRIPT), "-c", str(project.ini), *arguments],
        cwd=project.path,
        env=project.environment(**settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliFinished(completed.returncode, completed.stdout, completed.stderr)


@dataclass
class CliFinished:
    """A finished ``alembic-sgp-lock`` run, with stdout apart for JSON output."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def start_cli(project: Project, *arguments: str, **settings: str) -> subprocess.Popen[str]:
    """Start ``alembic-sgp-lock -c alembic.ini ARGUMENTS`` in the background."""
    return subprocess.Popen(
        [str(CONSOLE_SCRIPT), "-c", str(project.ini), *arguments],
        cwd=project.path,
        env=project.environment(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def snapshot(url: str) -> dict[str, Any]:
    """Describe every table, its columns and its rows, as a second connection reads them."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    described: dict[str, Any] = {}
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            schemas = inspector.get_schema_names()
            if connection.dialect.name in ("mysql", "mariadb"):
                # A MySQL schema is a whole database; look only at the test's own.
                schemas = [connection.engine.url.database]
            for schema in schemas:
                if schema == "information_schema":
                    continue
                for table in sorted(inspector.get_table_names(schema=schema)):
                    columns = [
                        (column["name"], str(column["type"]))
                        for column in inspector.get_columns(table, schema=schema)
                    ]
                    selectable = sa.table(
                        table, *[sa.column(name) for name, _ in columns], schema=schema
                    )
                    rows = connection.execute(sa.select(selectable)).all()
                    described[f"{schema}.{table}"] = (columns, sorted(map(repr, rows)))
    finally:
        engine.dispose()
    return described


def execute(url: str, *statements: str) -> None:
    """Run ``statements`` in one committed transaction on a new connection."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(sa.text(statement))
    finally:
        engine.dispose()
