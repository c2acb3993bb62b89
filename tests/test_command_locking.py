"""Which Alembic commands take the lock, on the Alembic release installed.

The plugin identifies the command from the step function that ``alembic.command``
hands to ``env.py``, which is not a public API, so these tests run on the
oldest and newest Alembic of the tox matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import (
    EXAMPLE_HEAD,
    EXAMPLE_REVISIONS,
    make_project,
    postgres_lock_key,
    read_state,
)
from tests.tcp_forwarder import free_port

NO_WAIT = {"MIGRATION_LOCK_TIMEOUT": "1", "MIGRATION_MAX_RETRIES": "0"}


def hold_migration_lock(url: str) -> tuple[sa.engine.Engine, sa.engine.Connection]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    connection = engine.connect()
    acquired = connection.execute(
        sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": postgres_lock_key()}
    ).scalar()
    assert acquired is True
    return engine, connection


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(("downgrade", "-1"), id="downgrade"),
        pytest.param(("stamp", EXAMPLE_REVISIONS[0]), id="stamp"),
        pytest.param(("upgrade", "head"), id="upgrade"),
    ],
)
def test_writing_command_waits_for_lock(
    tmp_path: Path, pg_url: str, arguments: tuple[str, ...]
) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1]).returncode == 0
    engine, blocker = hold_migration_lock(pg_url)
    try:
        finished = project.run(*arguments, **NO_WAIT)
    finally:
        blocker.close()
        engine.dispose()

    assert finished.returncode != 0
    assert "waiting for the migration lock" in finished.output
    assert read_state(pg_url).versions == [EXAMPLE_REVISIONS[1]]


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(("current",), id="current"),
        pytest.param(("upgrade", "head"), id="upgrade-at-head"),
    ],
)
def test_read_only_command_skips_lock(
    tmp_path: Path, pg_url: str, arguments: tuple[str, ...]
) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", "head").returncode == 0
    engine, blocker = hold_migration_lock(pg_url)
    try:
        finished = project.run(*arguments, **NO_WAIT)
    finally:
        blocker.close()
        engine.dispose()

    assert finished.returncode == 0, finished.output
    assert "Acquiring" not in finished.output
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]


def test_offline_sql_renders_without_connecting(tmp_path: Path) -> None:
    # Nothing listens on this port, so any connection attempt would fail.
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere"
    project = make_project(tmp_path, url)

    finished = project.run("upgrade", "head", "--sql")

    assert finished.returncode == 0, finished.output
    assert "Offline (--sql) mode" in finished.output
    assert "CREATE TABLE alembic_version" in finished.output
    assert f"UPDATE alembic_version SET version_num='{EXAMPLE_HEAD}'" in finished.output
    assert "Connecting to" not in finished.output
