"""Migrations are committed under each SQLAlchemy connection mode: 2.x style and 1.4 legacy.

SQLAlchemy 2.x, and 1.4 engines made with ``future=True``, begin a transaction
on the first statement (autobegin). A lock statement before
``context.configure()`` would then make Alembic run every revision inside a
transaction that is never committed. SQLAlchemy 1.4 engines without ``future=True``
do not autobegin. Each case checks the result from a second connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import EXAMPLE_HEAD, Project, make_project, read_state

SQLALCHEMY_1 = sa.__version__.startswith("1.")
EXAMPLE_TABLES = {"alembic_version", "customer", "invoice"}

ENV_PREAMBLE = """\
import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

import alembic_sgp_lock

fileConfig(context.config.config_file_name)
engine_options = {{"poolclass": sa.pool.NullPool}}
if sa.__version__.startswith("1."):
    engine_options["future"] = {future}
engine = sa.create_engine(os.environ["DATABASE_URL"], **engine_options)
"""

HOOK_ENV = """
alembic_sgp_lock.run_migrations(engine=engine)
engine.dispose()
"""

HAND_WRITTEN_ENV = """
with engine.connect() as connection:
    with alembic_sgp_lock.migration_lock(connection):
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
engine.dispose()
"""

MODES = [
    pytest.param(True, id="future"),
    pytest.param(
        False,
        id="legacy",
        marks=pytest.mark.skipif(
            not SQLALCHEMY_1, reason="SQLAlchemy 2.x has no legacy connection mode"
        ),
    ),
]
DATABASES = [
    pytest.param("pg_url", id="postgresql", marks=pytest.mark.postgresql),
    pytest.param("sqlite_url", id="sqlite"),
]


def project_with_env(folder: Path, url: str, body: str, *, future: bool) -> Project:
    project = make_project(folder, url)
    env_text = ENV_PREAMBLE.format(future=future) + body
    (project.path / "migrations" / "env.py").write_text(env_text)
    return project


def assert_migrated(url: str) -> None:
    state = read_state(url)
    assert state.tables >= EXAMPLE_TABLES
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1


@pytest.mark.parametrize("database", DATABASES)
@pytest.mark.parametrize("future", MODES)
def test_hook_with_engine_commits(
    tmp_path: Path, request: pytest.FixtureRequest, database: str, future: bool
) -> None:
    url = request.getfixturevalue(database)
    project = project_with_env(tmp_path, url, HOOK_ENV, future=future)

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    assert "Acquired " in finished.output
    assert_migrated(url)


@pytest.mark.parametrize("database", DATABASES)
@pytest.mark.parametrize("future", MODES)
def test_migration_lock_commits(
    tmp_path: Path, request: pytest.FixtureRequest, database: str, future: bool
) -> None:
    url = request.getfixturevalue(database)
    project = project_with_env(tmp_path, url, HAND_WRITTEN_ENV, future=future)

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    assert "Acquired " in finished.output
    assert "Released " in finished.output
    assert_migrated(url)


@pytest.mark.postgresql
def test_bare_postgresql_url_connects(tmp_path: Path, pg_url: str) -> None:
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, which this package does
    # not install, while 1.4 and 2.0 map it to psycopg2.
    bare_url = sa.engine.make_url(pg_url).set(drivername="postgresql")
    project = make_project(tmp_path, bare_url.render_as_string(hide_password=False))

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    assert_migrated(pg_url)


@pytest.mark.postgresql
@pytest.mark.parametrize("future", MODES)
def test_migration_lock_rejects_open_transaction(
    tmp_path: Path, pg_url: str, future: bool
) -> None:
    body = """
with engine.connect() as connection:
    if not connection.in_transaction():
        connection.begin()
    connection.execute(sa.text("SELECT 1"))
    with alembic_sgp_lock.migration_lock(connection):
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
engine.dispose()
"""
    project = project_with_env(tmp_path, pg_url, body, future=future)

    finished = project.run("upgrade", "head")

    assert finished.returncode != 0
    assert "is inside a transaction" in finished.output
    assert read_state(pg_url).tables == set()
