"""A killed holder in a long statement, and SIGTERM/SIGINT to real alembic processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from alembic_sgp_lock._session import CLIENT_CHECK_INTERVAL_MS
from tests.cli_support import PLAIN_ENV, start_cli, use_env
from tests.support import EXAMPLE_HEAD, make_project, postgres_lock_key, read_state

pytestmark = pytest.mark.postgresql

LONG_STATEMENT = """
op.create_table("long_step", sa.Column("id", sa.Integer, primary_key=True))
op.execute("SELECT pg_sleep(120)")
"""
PYTHON_SLEEP = """
op.create_table("slow_step", sa.Column("id", sa.Integer, primary_key=True))
time.sleep(120)
"""


def wait_for_session(url: str, condition: str, timeout: float = 30) -> int:
    """Wait until a session of the migration matches ``condition``; return its pid."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                pid = connection.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        f"AND pid <> pg_backend_pid() AND {condition}"
                    )
                ).scalar()
            if pid is not None:
                return int(pid)
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise AssertionError(f"no session matched {condition} in time")


def lock_is_free(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            taken = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": postgres_lock_key()}
            ).scalar()
            if taken:
                connection.execute(
                    sa.text("SELECT pg_advisory_unlock(:key)"), {"key": postgres_lock_key()}
                )
            return bool(taken)
    finally:
        engine.dispose()


def test_killed_holder_in_long_statement_frees_lock(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision("2f1a7b3c9d01", EXAMPLE_HEAD, LONG_STATEMENT)
    holder = project.start("upgrade", "head")
    wait_for_session(pg_url, "query LIKE '%pg_sleep(120)%' AND state = 'active'")

    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)
    killed_at = time.monotonic()
    while not lock_is_free(pg_url):
        assert time.monotonic() - killed_at < 30, "the lock was not freed within 30 s"
        time.sleep(0.1)
    freed_after = time.monotonic() - killed_at

    print(f"lock freed {freed_after:.2f} s after SIGKILL of a client in pg_sleep(120)")
    # client_connection_check_interval cancels the statement at its next check.
    assert freed_after < CLIENT_CHECK_INTERVAL_MS / 1000 + 3
    assert "long_step" not in read_state(pg_url).tables


@pytest.mark.parametrize("through", ["alembic", "alembic-sgp-lock"])
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_for_lock(
    tmp_path: Path, pg_url: str, stop_signal: int, through: str
) -> None:
    project = make_project(tmp_path, pg_url)
    if through == "alembic-sgp-lock":
        # Without the hook, so that the command's own lock is the one waiting.
        use_env(project, PLAIN_ENV)
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    blocker = engine.connect()
    blocker.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": postgres_lock_key()})
    blocker_pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    try:
        if through == "alembic":
            waiter = project.start("upgrade", "head", MIGRATION_LOCK_TIMEOUT="60")
        else:
            waiter = start_cli(project, "upgrade", "head", MIGRATION_LOCK_TIMEOUT="60")
        wait_for_session(pg_url, f"pid <> {blocker_pid}")
        # Let it reach the wait loop, past reading the version table.
        time.sleep(1.5)
        signalled_at = time.monotonic()
        waiter.send_signal(stop_signal)
        output, _ = waiter.communicate(timeout=30)
        stopped_after = time.monotonic() - signalled_at
    finally:
        blocker.close()
        engine.dispose()

    name = signal.Signals(stop_signal).name
    assert waiter.returncode != 0
    assert "Waiting for postgresql advisory lock" in output
    assert f"Stopped by {name} while waiting for the migration lock" in output
    assert "this process changed nothing" in output
    assert "retrying" not in output
    assert "Traceback" not in output
    # Far less than the 60 s lock timeout, with room for a loaded machine.
    assert stopped_after < 20
    assert read_state(pg_url).tables == set()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_revision_rolls_back(tmp_path: Path, pg_url: str, stop_signal: int) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision("3a2b8c4d0e12", EXAMPLE_HEAD, PYTHON_SLEEP)
    holder = project.start("upgrade", "head")
    wait_for_session(pg_url, "application_name LIKE '%alembic-sgp-lock since%'")
    time.sleep(0.5)

    holder.send_signal(stop_signal)
    output, _ = holder.communicate(timeout=30)

    name = signal.Signals(stop_signal).name
    assert holder.returncode != 0
    assert f"Stopped by {name}" in output
    assert "Released postgresql advisory lock" in output
    assert lock_is_free(pg_url)
    state = read_state(pg_url)
    assert "slow_step" not in state.tables
    assert state.versions == [EXAMPLE_HEAD]


def test_signal_during_statement_waits_for_it(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    statement = 'op.create_table("short_step", sa.Column("id", sa.Integer, primary_key=True))\n'
    statement += 'op.execute("SELECT pg_sleep(3)")'
    project.add_revision("4b3c9d5e1f23", EXAMPLE_HEAD, statement)
    holder = project.start("upgrade", "head")
    wait_for_session(pg_url, "query LIKE '%pg_sleep(3)%' AND state = 'active'")

    holder.send_signal(signal.SIGTERM)
    output, _ = holder.communicate(timeout=30)

    assert holder.returncode != 0
    assert "Stopped by SIGTERM" in output
    assert lock_is_free(pg_url)
    state = read_state(pg_url)
    assert "short_step" not in state.tables
    assert state.versions == [EXAMPLE_HEAD]
