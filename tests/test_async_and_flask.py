"""The hook under asyncio drivers (asyncpg, psycopg 3) and in a Flask-Migrate project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import (
    EXAMPLE_DIR,
    EXAMPLE_HEAD,
    SETTING_VARIABLES,
    make_project,
    read_state,
    run_together,
)

pytestmark = pytest.mark.postgresql

# Alembic's async template, with migration_lock() around the migrations in run_sync().
ASYNC_TEMPLATE_ENV = """\
import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from alembic_sgp_lock import migration_lock

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)


def do_run_migrations(connection):
    with migration_lock(connection):
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()


async def run_async_migrations():
    engine = create_async_engine(os.environ["DATABASE_URL"], poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


asyncio.run(run_async_migrations())
"""


ASYNC_DRIVERS = [
    pytest.param("postgresql+asyncpg", id="postgresql+asyncpg"),
    pytest.param(
        "postgresql+psycopg_async",
        id="postgresql+psycopg_async",
        marks=pytest.mark.skipif(
            sa.__version__.startswith("1."),
            reason="SQLAlchemy 1.4 has no psycopg 3 dialect; it came in SQLAlchemy 2.0",
        ),
    ),
]


def with_driver(url: str, driver: str) -> str:
    return sa.engine.make_url(url).set(drivername=driver).render_as_string(hide_password=False)


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_hook_with_async_url(tmp_path: Path, pg_url: str, driver: str) -> None:
    project = make_project(tmp_path, with_driver(pg_url, driver))

    results = run_together(project, 4)

    for returncode, output in results:
        assert returncode == 0, output
    outputs = "".join(output for _, output in results)
    assert f"Connecting to {driver}://" in outputs
    assert outputs.count("Running upgrade  -> 1a0c7e2b9d01") == 1
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_async_template_with_run_sync(tmp_path: Path, pg_url: str, driver: str) -> None:
    project = make_project(tmp_path, with_driver(pg_url, driver))
    (project.path / "migrations" / "env.py").write_text(ASYNC_TEMPLATE_ENV)

    results = run_together(project, 4)

    for returncode, output in results:
        assert returncode == 0, output
    outputs = "".join(output for _, output in results)
    assert "Acquired postgresql advisory lock" in outputs
    assert outputs.count("Running upgrade  -> 1a0c7e2b9d01") == 1
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1


FLASK_APP = """\
import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
db = SQLAlchemy(app)
migrate = Migrate(app, db, directory="migrations")
"""

# The Flask-Migrate env.py pattern: engine, metadata and options come from the extension.
FLASK_ENV = """\
from logging.config import fileConfig

from alembic import context
from flask import current_app

import alembic_sgp_lock

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)

extension = current_app.extensions["migrate"]
alembic_sgp_lock.run_migrations(
    engine=extension.db.engine,
    target_metadata=extension.db.metadata,
    **extension.configure_args,
)
"""


def flask_command(folder: Path, url: str, *arguments: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    for name in SETTING_VARIABLES:
        env.pop(name, None)
    env["DATABASE_URL"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "db", *arguments],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_flask_db_upgrade_with_hook(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "app.py").write_text(FLASK_APP)
    init = flask_command(tmp_path, pg_url, "init")
    init_output, _ = init.communicate(timeout=60)
    assert init.returncode == 0, init_output
    migrations = tmp_path / "migrations"
    (migrations / "env.py").write_text(textwrap.dedent(FLASK_ENV))
    for revision_file in (EXAMPLE_DIR / "versions").glob("*.py"):
        shutil.copy(revision_file, migrations / "versions" / revision_file.name)

    processes = [flask_command(tmp_path, pg_url, "upgrade") for _ in range(4)]
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=180)
        results.append((process.returncode, output))

    for returncode, output in results:
        assert returncode == 0, output
    outputs = "".join(output for _, output in results)
    assert "Acquired postgresql advisory lock" in outputs
    assert outputs.count("Running upgrade  -> 1a0c7e2b9d01") == 1
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
