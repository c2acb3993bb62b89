"""Concurrent `alembic upgrade head` processes, half-applied revisions and recovery on MariaDB."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config
from sqlalchemy.engine import make_url

from alembic_sgp_lock import (
    HalfAppliedRevisionError,
    InvalidSettingError,
    LockTimeoutError,
    MigrationLockError,
    Settings,
    clear_half_applied,
)
from alembic_sgp_lock._mysql import MAX_LOCK_NAME_LENGTH, lock_name
from tests.cli_support import run_cli
from tests.conftest import MYSQL_ADMIN_URL
from tests.support import (
    EXAMPLE_HEAD,
    EXAMPLE_REVISIONS,
    make_project,
    read_state,
    run_together,
)

pytestmark = pytest.mark.mysql

EXAMPLE_TABLES = {"alembic_version", "customer", "invoice"}
MARKER_TABLE = "alembic_sgp_lock_in_progress"


def database_name(url: str) -> str:
    name = make_url(url).database
    assert name is not None
    return name


def marker_rows(url: str) -> list[dict[str, object]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table(MARKER_TABLE):
                return []
            rows = connection.execute(sa.text(f"SELECT * FROM {MARKER_TABLE}")).mappings()
            return [dict(row) for row in rows]
    finally:
        engine.dispose()


@pytest.fixture
def second_mysql_url() -> Iterator[str]:
    """Create a second database on the same server; yield its URL and drop it afterwards."""
    admin_url = make_url(MYSQL_ADMIN_URL)
    name = f"sgp_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE `{name}`"))
    yield admin_url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
    admin.dispose()


def test_lock_name_includes_database() -> None:
    assert lock_name("shop", "alembic_version", None) == "alembic-sgp-lock:shop.alembic_version"
    assert lock_name("shop", "alembic_version", "deploy") == "alembic-sgp-lock:shop:deploy"


def test_lock_name_long_or_mixed_case_hashed() -> None:
    long_database = "d" * 80
    first = lock_name(long_database, "alembic_version", None)
    second = lock_name(long_database + "x", "alembic_version", None)
    upper = lock_name("Shop", "alembic_version", None)
    lower = lock_name("shop", "alembic_version", None)

    assert len(first) == MAX_LOCK_NAME_LENGTH
    assert first != second
    assert upper != lower
    assert upper == upper.lower()
    assert len(upper) <= MAX_LOCK_NAME_LENGTH


def test_sixteen_processes_on_empty_database(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)

    started = time.monotonic()
    results = run_together(project, 16)
    elapsed = time.monotonic() - started

    for returncode, output in results:
        assert returncode == 0, output
    state = read_state(mysql_url)
    assert state.tables >= EXAMPLE_TABLES
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    outputs = "".join(output for _, output in results)
    for source, revision in zip(("", *EXAMPLE_REVISIONS[:-1]), EXAMPLE_REVISIONS, strict=True):
        assert outputs.count(f"Running upgrade {source} -> {revision}") == 1
    assert marker_rows(mysql_url) == []
    print(f"16 processes on MariaDB finished in {elapsed:.2f} s")


def test_single_run_commits_under_lock(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    lock = lock_name(database_name(mysql_url), "alembic_version", None)
    assert f"Acquired mysql user lock {lock!r}" in finished.output
    assert f"Released mysql user lock {lock!r}" in finished.output
    state = read_state(mysql_url)
    assert state.tables == EXAMPLE_TABLES | {MARKER_TABLE}
    assert state.versions == [EXAMPLE_HEAD]


def hold_mysql_lock(url: str) -> tuple[sa.engine.Engine, sa.engine.Connection, int]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    connection = engine.connect()
    name = lock_name(database_name(url), "alembic_version", None)
    acquired = connection.execute(sa.text("SELECT GET_LOCK(:name, 0)"), {"name": name}).scalar()
    assert acquired == 1
    session_id = connection.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
    return engine, connection, int(session_id)


def test_lock_timeout_names_holder(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    engine, blocker, blocker_id = hold_mysql_lock(mysql_url)
    try:
        started = time.monotonic()
        finished = project.run(
            "upgrade",
            "head",
            MIGRATION_LOCK_TIMEOUT="2",
            MIGRATION_MAX_RETRIES="1",
            MIGRATION_RETRY_BACKOFF="100",
            MIGRATION_MAX_WAIT_TIME="30",
        )
        elapsed = time.monotonic() - started
    finally:
        blocker.close()
        engine.dispose()

    assert finished.returncode != 0
    assert (
        "Timed out after 2.0 s waiting for the migration lock mysql user lock" in finished.output
    )
    assert f"connection id {blocker_id}" in finished.output
    assert "client 127.0.0.1:" in finished.output
    assert "user 'root'" in finished.output
    assert "Giving up after 2 attempt(s)" in finished.output
    assert 4 <= elapsed < 30
    assert read_state(mysql_url).tables == set()


def test_zero_lock_timeout_does_not_wait(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    engine, blocker, blocker_id = hold_mysql_lock(mysql_url)
    try:
        finished = project.run(
            "upgrade", "head", MIGRATION_LOCK_TIMEOUT="0", MIGRATION_MAX_RETRIES="0"
        )
    finally:
        blocker.close()
        engine.dispose()

    assert finished.returncode != 0
    assert "Waiting for" not in finished.output
    assert "Timed out" not in finished.output
    assert f"was held by connection id {blocker_id}, client 127.0.0.1:" in finished.output
    assert "; not waiting, because the timeout is 0 s" in finished.output
    assert "this attempt did not wait for it because its timeout was 0 s" in finished.output
    assert read_state(mysql_url).tables == set()


def test_lock_released_hands_off_quickly(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    # The waiter then holds the lock for 2 s, long enough to be seen holding it.
    project.add_revision("5e4f1c6d3b45", EXAMPLE_HEAD, "time.sleep(2)")
    name = lock_name(database_name(mysql_url), "alembic_version", None)
    engine, blocker, blocker_id = hold_mysql_lock(mysql_url)
    observer = engine.connect()
    try:
        waiter = project.start("upgrade", "head", MIGRATION_LOCK_TIMEOUT="60")
        deadline = time.monotonic() + 60
        while not observer.execute(
            sa.text(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE STATE = 'User lock' AND INFO LIKE '%GET_LOCK%' AND DB = DATABASE()"
            )
        ).scalar():
            assert time.monotonic() < deadline, "the waiter never waited in GET_LOCK"
            time.sleep(0.01)
        released_at = time.monotonic()
        blocker.close()
        holder_id = None
        while holder_id in (None, blocker_id) and time.monotonic() < released_at + 30:
            holder_id = observer.execute(
                sa.text("SELECT IS_USED_LOCK(:name)"), {"name": name}
            ).scalar()
            time.sleep(0.005)
        handed_off = time.monotonic() - released_at
        output, _ = waiter.communicate(timeout=60)
    finally:
        observer.close()
        engine.dispose()

    assert waiter.returncode == 0, output
    assert "Waiting for mysql user lock" in output
    assert holder_id not in (None, blocker_id)
    # GET_LOCK wakes a waiter as soon as the lock is free; polling at a fixed
    # interval of a second or more would show here.
    assert handed_off < 1.0, handed_off
    assert read_state(mysql_url).versions == ["5e4f1c6d3b45"]


SLOW_REVISION = """
op.create_table("slow_step", sa.Column("id", sa.Integer, primary_key=True))
time.sleep(float(__import__("os").environ.get("SLOW_REVISION_SECONDS", "0")))
op.create_table("after_sleep", sa.Column("id", sa.Integer, primary_key=True))
"""
SLOW_REVISION_ID = "4d3f0b5e2a34"


def wait_for_marker(url: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = marker_rows(url)
        if rows and "slow_step" in str(rows[0]["statements"]):
            return rows[0]
        time.sleep(0.1)
    raise AssertionError("no revision was marked as started in time")


def test_killed_holder_leaves_marker(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    assert project.run("upgrade", "head").returncode == 0
    project.add_revision(SLOW_REVISION_ID, EXAMPLE_HEAD, SLOW_REVISION, message="slow step")
    holder = project.start("upgrade", "head", SLOW_REVISION_SECONDS="120")
    marker = wait_for_marker(mysql_url)

    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)
    started = time.monotonic()
    rejected = project.run("upgrade", "head", MIGRATION_LOCK_TIMEOUT="30")
    rejected_after = time.monotonic() - started

    assert marker["revision"] == SLOW_REVISION_ID
    assert marker["direction"] == "upgrade"
    assert f"pid {holder.pid}" in str(marker["holder"])
    assert rejected.returncode != 0
    # The server freed the killed holder's lock; the refusal is not a lock timeout.
    assert rejected_after < 20
    assert "Timed out" not in rejected.output
    assert f"Revision {SLOW_REVISION_ID} (upgrade from {EXAMPLE_HEAD}" in rejected.output
    assert "killed or disconnected" in rejected.output
    assert "1. CREATE TABLE slow_step" in rejected.output
    assert f"clear-half-applied --stamp {SLOW_REVISION_ID}" in rejected.output
    assert rejected.output.count("(attempt ") == 1
    assert read_state(mysql_url).versions == [EXAMPLE_HEAD]

    # The operator finishes upgrade() by hand, then stamps the revision.
    engine = sa.create_engine(mysql_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE after_sleep (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    cleared = run_cli(project, "clear-half-applied", "--stamp", SLOW_REVISION_ID)
    finished = project.run("upgrade", "head")

    assert cleared.returncode == 0, cleared.output
    assert (
        f"Cleared the half-applied marker of revision {SLOW_REVISION_ID} "
        f"and stamped {SLOW_REVISION_ID}"
    ) in cleared.stdout
    assert marker_rows(mysql_url) == []
    assert finished.returncode == 0, finished.output
    assert "nothing to migrate" in finished.output
    state = read_state(mysql_url)
    assert state.versions == [SLOW_REVISION_ID]
    assert {"slow_step", "after_sleep"} <= state.tables


FAILING_REVISION = """
op.create_table("half_a", sa.Column("id", sa.Integer, primary_key=True))
op.execute("SELEC broken")
op.create_table("half_b", sa.Column("id", sa.Integer, primary_key=True))
"""
FAILING_REVISION_ID = "5e4a1c6f3b45"


def test_failed_revision_marked_then_recovered(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    project.add_revision(FAILING_REVISION_ID, EXAMPLE_HEAD, FAILING_REVISION)

    failed = project.run("upgrade", "head", MIGRATION_MAX_RETRIES="5")
    rejected = project.run("upgrade", "head", MIGRATION_MAX_RETRIES="5")

    assert failed.returncode != 0
    assert "retrying" not in failed.output
    assert f"Revision {FAILING_REVISION_ID} failed after 1 statement(s) took effect" in (
        failed.output
    )
    state = read_state(mysql_url)
    assert "half_a" in state.tables
    assert "half_b" not in state.tables
    assert state.versions == [EXAMPLE_HEAD]
    rows = marker_rows(mysql_url)
    assert len(rows) == 1
    assert rows[0]["revision"] == FAILING_REVISION_ID
    assert "1064" in str(rows[0]["error"])
    assert rejected.returncode != 0
    assert "retrying" not in rejected.output
    assert f"Revision {FAILING_REVISION_ID} (upgrade from {EXAMPLE_HEAD} to " in rejected.output
    assert "It failed with: ProgrammingError" in rejected.output
    assert "1. CREATE TABLE half_a" in rejected.output
    assert "2. SELEC broken" in rejected.output
    assert "alembic-sgp-lock clear-half-applied`" in rejected.output
    assert "Run `alembic upgrade head` again" in rejected.output

    # The operator undoes the first CREATE TABLE, fixes the revision and clears the marker.
    engine = sa.create_engine(mysql_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE half_a"))
    engine.dispose()
    project.add_revision(
        FAILING_REVISION_ID, EXAMPLE_HEAD, FAILING_REVISION.replace("SELEC", "SELECT 1 --")
    )
    cleared = run_cli(project, "clear-half-applied")
    finished = project.run("upgrade", "head")

    assert cleared.returncode == 0, cleared.output
    assert f"Cleared the half-applied marker of revision {FAILING_REVISION_ID}" in cleared.stdout
    assert finished.returncode == 0, finished.output
    state = read_state(mysql_url)
    assert state.versions == [FAILING_REVISION_ID]
    assert {"half_a", "half_b"} <= state.tables
    assert marker_rows(mysql_url) == []


def test_first_statement_failure_leaves_no_marker(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    project.add_revision("6f5b2d7a4c56", EXAMPLE_HEAD, 'op.execute("SELEC broken")')

    failed = project.run("upgrade", "head")
    again = project.run("upgrade", "head")

    assert failed.returncode != 0
    assert "failed before any statement took effect" in failed.output
    assert marker_rows(mysql_url) == []
    assert again.returncode != 0
    assert "did not finish" not in again.output
    assert "SELEC broken" in again.output
    assert read_state(mysql_url).versions == [EXAMPLE_HEAD]


def test_recovery_rejected_while_locked(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    engine, blocker, blocker_id = hold_mysql_lock(mysql_url)
    try:
        with pytest.raises(LockTimeoutError) as raised:
            clear_half_applied(Config(str(project.ini)), url=mysql_url)
    finally:
        blocker.close()
        engine.dispose()

    assert f"connection id {blocker_id}" in str(raised.value)


def test_recovery_command_rejected_while_locked(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    engine, blocker, blocker_id = hold_mysql_lock(mysql_url)
    try:
        finished = run_cli(project, "clear-half-applied", "--lock-timeout", "1")
    finally:
        blocker.close()
        engine.dispose()

    assert finished.returncode == 4, finished.output
    assert "Timed out after 1.0 s" in finished.stderr
    assert f"connection id {blocker_id}" in finished.stderr


def test_recovery_without_marker_fails(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    assert project.run("upgrade", "head").returncode == 0

    with pytest.raises(MigrationLockError) as raised:
        clear_half_applied(Config(str(project.ini)), url=mysql_url)

    assert "nothing to clear" in str(raised.value)
    assert not isinstance(raised.value, HalfAppliedRevisionError)


TWO_SECOND_REVISION = """
op.create_table("slow_step", sa.Column("id", sa.Integer, primary_key=True))
time.sleep(2)
"""


def test_two_databases_migrate_in_parallel(
    tmp_path: Path, mysql_url: str, second_mysql_url: str
) -> None:
    urls = (mysql_url, second_mysql_url)
    projects = []
    for number, url in enumerate(urls):
        project = make_project(tmp_path / f"project{number}", url)
        project.add_revision(SLOW_REVISION_ID, EXAMPLE_HEAD, TWO_SECOND_REVISION)
        projects.append(project)

    names = [lock_name(database_name(url), "alembic_version", None) for url in urls]
    observer = sa.create_engine(
        mysql_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    both_held = False
    processes = [project.start("upgrade", "head") for project in projects]
    with observer.connect() as connection:
        while any(process.poll() is None for process in processes):
            holders = connection.execute(
                sa.text("SELECT IS_USED_LOCK(:first), IS_USED_LOCK(:second)"),
                {"first": names[0], "second": names[1]},
            ).one()
            both_held = both_held or None not in holders
            time.sleep(0.05)
    observer.dispose()
    outputs = [process.communicate(timeout=60)[0] for process in processes]

    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert "Waiting for mysql user lock" not in output
    for url in urls:
        assert read_state(url).versions == [SLOW_REVISION_ID]
    # Each run holds its lock for over 2 s, so both locks were seen held at once.
    assert both_held


def test_mysqlclient_url(tmp_path: Path, mysql_url: str) -> None:
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("mysqlclient is not installed; .ci/run installs it with libmariadb-dev")
        pytest.skip("mysqlclient is not installed")
    url = make_url(mysql_url).set(drivername="mysql+mysqldb")
    rendered = url.render_as_string(hide_password=False)
    project = make_project(tmp_path, rendered)
    project.add_revision(FAILING_REVISION_ID, EXAMPLE_HEAD, FAILING_REVISION)

    results = run_together(project, 4)
    rejected = project.run("upgrade", "head")

    assert sum(returncode == 0 for returncode, _ in results) == 0
    state = read_state(rendered)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    rows = marker_rows(rendered)
    assert rows[0]["statement_count"] == 2
    assert "It failed with" in rejected.output


@pytest.mark.parametrize("value", ["", "app.marker", "x" * 65, "bad`name"])
def test_marker_table_setting_invalid(value: str) -> None:
    with pytest.raises(InvalidSettingError) as raised:
        Settings.from_env({"MIGRATION_MARKER_TABLE": value})

    assert f"MIGRATION_MARKER_TABLE={value!r} is invalid" in str(raised.value)


def test_marker_table_setting_used(tmp_path: Path, mysql_url: str) -> None:
    project = make_project(tmp_path, mysql_url)
    project.add_revision(FAILING_REVISION_ID, EXAMPLE_HEAD, FAILING_REVISION)

    failed = project.run("upgrade", "head", MIGRATION_MARKER_TABLE="deploy_marker")
    rejected = project.run("upgrade", "head", MIGRATION_MARKER_TABLE="deploy_marker")

    assert failed.returncode != 0
    tables = read_state(mysql_url).tables
    assert "deploy_marker" in tables
    assert MARKER_TABLE not in tables
    assert rejected.returncode != 0
    assert "marker in table deploy_marker" in rejected.output
