"""The ``alembic-sgp-lock`` command: locking, lock status and exit codes, as real processes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from alembic_sgp_lock import Settings, migration_lock
from tests.cli_support import PLAIN_ENV, CliFinished, run_cli, start_cli, use_env
from tests.support import EXAMPLE_HEAD, EXAMPLE_REVISIONS, Project, make_project, read_state
from tests.tcp_forwarder import free_port
from tests.test_postgresql_upgrade import hold_lock

EXAMPLE_TABLES = {"alembic_version", "customer", "invoice"}


def hold_sqlite_lock(url: str) -> int:
    """Lock the SQLite lock file from this process as a migration would; return the descriptor."""
    path = sa.engine.make_url(url).database + ".alembic-sgp-lock"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = {"pid": os.getpid(), "host": "test-host", "since": time.time() - 5}
    os.write(descriptor, json.dumps(record).encode())
    return descriptor


@pytest.mark.postgresql
def test_lock_status_names_postgres_holder(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    engine, blocker = hold_lock(pg_url, "blocker-app")
    try:
        blocker_pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        blocker.execute(sa.text("SELECT 'deploy step 7'"))
        held = run_cli(project, "lock-status", "--format", "json")
        text = run_cli(project, "lock-status")
    finally:
        blocker.close()
        engine.dispose()
    free = run_cli(project, "lock-status", "--format", "json")

    assert held.returncode == 0, held.output
    status = json.loads(held.stdout)
    assert status["held"] is True
    assert status["lock"].startswith("postgresql advisory lock ")
    holder = status["holder"]
    assert holder["pid"] == blocker_pid
    assert holder["application_name"] == "blocker-app"
    assert holder["client_address"].startswith("127.0.0.1:")
    assert holder["statement"] == "SELECT 'deploy step 7'"
    assert text.returncode == 0, text.output
    assert "The migration lock is held" in text.stdout
    assert f"pid: {blocker_pid}" in text.stdout
    assert "application name: blocker-app" in text.stdout
    assert free.returncode == 0, free.output
    assert json.loads(free.stdout) == {
        "lock": status["lock"],
        "held": False,
        "holder": None,
        "waiters": [],
    }


@pytest.mark.postgresql
def test_lock_status_multiline_statement(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    engine, blocker = hold_lock(pg_url, "blocker-app")
    statement = "SELECT 'deploy step 7',\n       2\r\n\tFROM pg_catalog.pg_class LIMIT 1"
    try:
        blocker.execute(sa.text(statement))
        as_json = run_cli(project, "lock-status", "--format", "json")
        as_text = run_cli(project, "lock-status")
    finally:
        blocker.close()
        engine.dispose()

    assert as_json.returncode == 0, as_json.output
    assert json.loads(as_json.stdout)["holder"]["statement"] == statement
    assert as_text.returncode == 0, as_text.output
    lines = as_text.stdout.splitlines()
    assert lines[0].startswith("The migration lock is held: ")
    for line in lines[1:]:
        assert line.startswith("  "), as_text.stdout
    assert "  statement: SELECT 'deploy step 7', 2 FROM pg_catalog.pg_class LIMIT 1" in lines, (
        as_text.stdout
    )
    description = json.loads(as_json.stdout)["holder"]["description"]
    assert "\\n" not in description
    assert "'deploy step 7', 2 FROM pg_catalog.pg_class LIMIT 1" in description


def run_cli_while_locked(
    pg_url: str, project: Project, *arguments: str, **settings: str
) -> CliFinished:
    """Run ``alembic-sgp-lock ARGUMENTS`` while a session named blocker-app holds the lock."""
    engine, blocker = hold_lock(pg_url, "blocker-app")
    try:
        return run_cli(project, *arguments, **settings)
    finally:
        blocker.close()
        engine.dispose()


def queued_waiters(project: Project) -> list[dict[str, object]]:
    status = run_cli(project, "lock-status", "--format", "json")
    assert status.returncode == 0, status.output
    waiters: list[dict[str, object]] = json.loads(status.stdout)["waiters"]
    return waiters


@pytest.mark.postgresql
def test_lock_status_lists_queued_waiters(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    engine, blocker = hold_lock(pg_url, "blocker-app")
    waiters = []
    try:
        for number in range(2):
            waiters.append(
                project.start(
                    "upgrade",
                    "head",
                    MIGRATION_LOCK_TIMEOUT="120",
                    PGAPPNAME=f"queued-{number}",
                )
            )
            deadline = time.monotonic() + 60
            while len(queued_waiters(project)) <= number:
                assert time.monotonic() < deadline, "the waiter never queued"
                time.sleep(0.2)
        queued = run_cli(project, "lock-status", "--format", "json")
        text = run_cli(project, "lock-status")
    finally:
        blocker.close()
        engine.dispose()
    outputs = [waiter.communicate(timeout=120)[0] for waiter in waiters]

    status = json.loads(queued.stdout)
    assert status["held"] is True
    assert [waiter["application_name"] for waiter in status["waiters"]] == [
        "queued-0",
        "queued-1",
    ]
    ages = [waiter["waiting_seconds"] for waiter in status["waiters"]]
    assert ages[0] >= ages[1] >= 0
    assert "Waiting in the queue: 2, longest waiting first" in text.stdout
    assert "(queued-0): waiting " in text.stdout
    for waiter, output in zip(waiters, outputs, strict=True):
        assert waiter.returncode == 0, output
    assert queued_waiters(project) == []
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]


@pytest.mark.postgresql
def test_lock_status_shows_migration_since(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    project.add_revision("7a0000000007", EXAMPLE_HEAD, "time.sleep(6)")
    migration = project.start("upgrade", "head")
    try:
        deadline = time.monotonic() + 30
        status: dict[str, object] = {"held": False}
        while time.monotonic() < deadline and not status["held"]:
            status = json.loads(run_cli(project, "lock-status", "--format", "json").stdout)
        output, _ = migration.communicate(timeout=60)
    finally:
        migration.kill()

    assert migration.returncode == 0, output
    assert status["held"] is True
    holder = status["holder"]
    assert isinstance(holder, dict)
    assert holder["since"] is not None
    assert holder["held_seconds"] is not None


@pytest.mark.postgresql
def test_lock_status_held_seconds_precise(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            started = time.monotonic()
            with migration_lock(connection, settings=Settings.from_env({})):
                status = json.loads(run_cli(project, "lock-status", "--format", "json").stdout)
                elapsed = time.monotonic() - started
    finally:
        engine.dispose()

    assert status["held"] is True
    # The tag keeps tenths of a second, so the report is never a whole second high.
    assert 0 <= status["holder"]["held_seconds"] <= elapsed + 0.1


def test_lock_status_sqlite_holder(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)
    assert project.run("upgrade", "head").returncode == 0
    free = run_cli(project, "lock-status", "--format", "json")
    descriptor = hold_sqlite_lock(sqlite_url)
    try:
        held = run_cli(project, "lock-status", "--format", "json")
    finally:
        os.close(descriptor)

    assert free.returncode == 0, free.output
    assert json.loads(free.stdout)["held"] is False
    assert held.returncode == 0, held.output
    status = json.loads(held.stdout)
    assert status["held"] is True
    assert status["holder"]["pid"] == os.getpid()
    assert status["holder"]["client_address"] == "test-host"
    assert status["holder"]["held_seconds"] >= 5


@pytest.mark.postgresql
def test_lock_timeout_exit_code(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    finished = run_cli_while_locked(
        pg_url, project, "upgrade", "head", MIGRATION_LOCK_TIMEOUT="1", MIGRATION_MAX_RETRIES="0"
    )

    assert finished.returncode == 4, finished.output
    assert "FAILED: Timed out after 1.0 s waiting for the migration lock" in finished.stderr
    assert "application 'blocker-app'" in finished.stderr
    assert read_state(pg_url).tables == set()


@pytest.mark.postgresql
def test_zero_lock_timeout_exit_code(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    finished = run_cli_while_locked(
        pg_url, project, "upgrade", "head", MIGRATION_LOCK_TIMEOUT="0", MIGRATION_MAX_RETRIES="0"
    )

    assert finished.returncode == 4, finished.output
    assert "FAILED: The migration lock postgresql advisory lock" in finished.stderr
    assert "this attempt did not wait for it because its timeout was 0 s" in finished.stderr
    assert "Waiting for" not in finished.stderr
    assert "application 'blocker-app'" in finished.stderr
    assert read_state(pg_url).tables == set()


@pytest.mark.postgresql
def test_lock_timeout_after_retries_exit_code(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    finished = run_cli_while_locked(
        pg_url,
        project,
        "upgrade",
        "head",
        MIGRATION_LOCK_TIMEOUT="1",
        MIGRATION_MAX_RETRIES="1",
        MIGRATION_RETRY_BACKOFF="50",
    )

    assert finished.returncode == 4, finished.output
    assert "FAILED: Migration failed after 2 attempt(s)" in finished.stderr
    # Both attempts waited their 1 s, and the message gives the sum.
    total = re.search(
        r"last error: LockTimeoutError: Timed out after ([0-9.]+) s in total", finished.stderr
    )
    assert total is not None, finished.stderr
    assert 2.0 <= float(total.group(1)) < 3.0
    assert "Another migration still holds the lock" in finished.stderr
    assert "reachable" not in finished.stderr
    assert read_state(pg_url).tables == set()


def test_retries_exhausted_exit_code(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere"
    project = make_project(tmp_path, url)

    finished = run_cli(
        project,
        "upgrade",
        "head",
        MIGRATION_MAX_RETRIES="1",
        MIGRATION_RETRY_BACKOFF="50",
    )

    assert finished.returncode == 5, finished.output
    assert "FAILED: Migration failed after 2 attempt(s)" in finished.stderr
    assert "Check that the database is reachable" in finished.stderr


@pytest.mark.postgresql
def test_missing_database_fails_at_once(tmp_path: Path, pg_url: str) -> None:
    url = sa.engine.make_url(pg_url).set(database="sgp_no_such_database")
    project = make_project(tmp_path, url.render_as_string(hide_password=False))

    upgraded = run_cli(project, "upgrade", "head", MIGRATION_MAX_RETRIES="5")
    checked = run_cli(project, "preflight")

    assert upgraded.returncode == 1, upgraded.output
    assert 'database "sgp_no_such_database" does not exist' in upgraded.stderr
    assert "retrying" not in upgraded.output
    assert "FAILED: Could not connect to postgresql+psycopg2://" in upgraded.stderr
    assert "MIGRATION_DATABASE_URL" in upgraded.stderr
    assert "Traceback" not in upgraded.stderr
    assert checked.returncode == 1, checked.output
    assert "FAILED: Could not connect to postgresql+psycopg2://" in checked.stderr
    assert "Traceback" not in checked.stderr


@pytest.mark.postgresql
def test_clear_half_applied_plain_postgresql_url(tmp_path: Path, pg_url: str) -> None:
    url = sa.engine.make_url(pg_url).set(drivername="postgresql")
    project = make_project(tmp_path, url.render_as_string(hide_password=False))

    finished = run_cli(project, "clear-half-applied")

    # No marker exists, and the plain URL reached the server through psycopg2.
    assert finished.returncode == 1, finished.output
    assert "there is nothing to clear" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_invalid_setting_exit_code(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    finished = run_cli(project, "upgrade", "head", MIGRATION_LOCK_TIMEOUT="ten")

    assert finished.returncode == 3, finished.output
    assert "FAILED: MIGRATION_LOCK_TIMEOUT='ten' is invalid" in finished.stderr
    assert read_state(sqlite_url).tables == set()


@pytest.mark.parametrize("command", ["preflight", "lock-status", "ledger"])
def test_json_output_on_failure(tmp_path: Path, sqlite_url: str, command: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    invalid = run_cli(project, command, "--format", "json", MIGRATION_LOCK_TIMEOUT="ten")
    unreachable = run_cli(
        project,
        "--database-url",
        f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/test",
        command,
        "--format",
        "json",
    )

    assert invalid.returncode == 3, invalid.output
    document = json.loads(invalid.stdout)
    assert document["ok"] is False
    assert document["exit_code"] == 3
    assert "MIGRATION_LOCK_TIMEOUT='ten' is invalid" in document["error"]
    assert unreachable.returncode == 1, unreachable.output
    document = json.loads(unreachable.stdout)
    assert document["exit_code"] == 1
    assert document["error"].startswith("Could not connect to postgresql+psycopg2://")
    assert read_state(sqlite_url).tables == set()


def test_unusable_url_exit_code(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    finished = run_cli(project, "--database-url", "nosuchdriver://x/y", "preflight")

    assert finished.returncode == 3, finished.output
    assert "The database URL nosuchdriver://x/y cannot be used" in finished.stderr


def test_usage_error_exit_code(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    finished = run_cli(project, "preflight", "--format", "yaml")

    assert finished.returncode == 2, finished.output
    assert "invalid choice: 'yaml'" in finished.stderr


def test_alembic_commands_work_unchanged(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    upgraded = run_cli(project, "upgrade", EXAMPLE_REVISIONS[1])
    current = run_cli(project, "current")
    history = run_cli(project, "history")
    offline = run_cli(project, "upgrade", f"{EXAMPLE_REVISIONS[1]}:head", "--sql")
    downgraded = run_cli(project, "downgrade", "base")
    stamped = run_cli(project, "stamp", "head")
    missing = run_cli(project, "show", "ffffffffffff")

    assert upgraded.returncode == 0, upgraded.output
    assert current.returncode == 0, current.output
    assert EXAMPLE_REVISIONS[1] in current.stdout
    assert history.returncode == 0, history.output
    assert f"{EXAMPLE_REVISIONS[1]} -> {EXAMPLE_HEAD} (head)" in history.stdout
    assert offline.returncode == 0, offline.output
    assert "INSERT INTO customer" in offline.stdout
    assert downgraded.returncode == 0, downgraded.output
    assert stamped.returncode == 0, stamped.output
    assert read_state(sqlite_url).versions == [EXAMPLE_HEAD]
    # SQLite has no transactional DDL, so the half-applied marker table exists too.
    assert read_state(sqlite_url).tables == {"alembic_version", "alembic_sgp_lock_in_progress"}
    assert missing.returncode == 1, missing.output
    assert "FAILED: " in missing.stderr


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_command_and_hook_lock_once(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    project = make_project(tmp_path, url)

    started = time.monotonic()
    finished = run_cli(project, "upgrade", "head", MIGRATION_LOCK_TIMEOUT="20")
    elapsed = time.monotonic() - started

    assert finished.returncode == 0, finished.output
    assert finished.output.count("Acquired ") == 1
    assert "is already held by this process; not locking again" in finished.output
    # Waiting for itself would take the whole 20 s lock timeout.
    assert elapsed < 15
    assert read_state(url).versions == [EXAMPLE_HEAD]


@pytest.mark.postgresql
def test_command_locks_without_hook(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    use_env(project, PLAIN_ENV)
    blocked = run_cli_while_locked(
        pg_url, project, "upgrade", "head", MIGRATION_LOCK_TIMEOUT="1", MIGRATION_MAX_RETRIES="0"
    )
    tables_while_blocked = read_state(pg_url).tables
    unblocked = run_cli(project, "upgrade", "head")

    assert blocked.returncode == 4, blocked.output
    assert tables_while_blocked == set()
    assert unblocked.returncode == 0, unblocked.output
    assert "Acquired postgresql advisory lock" in unblocked.output
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]


@pytest.mark.postgresql
@pytest.mark.slow
def test_many_commands_without_hook(tmp_path: Path, pg_url: str) -> None:
    # Without a lock, plain Alembic processes race on an empty database.
    project = make_project(tmp_path, pg_url)
    use_env(project, PLAIN_ENV)

    processes = [start_cli(project, "upgrade", "head") for _ in range(8)]
    results = [(process.communicate(timeout=180)[0], process.returncode) for process in processes]

    for output, returncode in results:
        assert returncode == 0, output
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    outputs = "".join(output for output, _ in results)
    assert outputs.count(f"Running upgrade  -> {EXAMPLE_REVISIONS[0]}") == 1


def test_command_preflight_without_hook(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)
    use_env(project, PLAIN_ENV)
    assert run_cli(project, "upgrade", "head").returncode == 0
    engine = sa.create_engine(sqlite_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = 'abcdef123456'"))
    engine.dispose()

    finished = run_cli(project, "upgrade", "head")

    assert finished.returncode == 7, finished.output
    assert "[database-ahead]" in finished.stderr
    assert read_state(sqlite_url).versions == ["abcdef123456"]


@pytest.mark.postgresql
def test_unknown_target_rejected_before_lock(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    use_env(project, PLAIN_ENV)
    finished = run_cli_while_locked(
        pg_url, project, "upgrade", "nosuchrev", MIGRATION_LOCK_TIMEOUT="60"
    )

    assert finished.returncode == 6, finished.output
    assert "[unknown-target] The target revision 'nosuchrev'" in finished.stderr
    assert "Acquiring " not in finished.output
    assert read_state(pg_url).tables == set()


@pytest.mark.postgresql
@pytest.mark.parametrize(
    ("target", "takes_lock"),
    [
        pytest.param("head", False, id="head"),
        pytest.param("heads", False, id="heads"),
        pytest.param(EXAMPLE_HEAD, True, id="explicit-revision"),
    ],
)
def test_command_at_head_skips_lock(
    tmp_path: Path, pg_url: str, target: str, takes_lock: bool
) -> None:
    # Without the hook, so that only the command's own lock is at stake.
    project = make_project(tmp_path, pg_url)
    use_env(project, PLAIN_ENV)
    assert run_cli(project, "upgrade", "head").returncode == 0
    finished = run_cli_while_locked(
        pg_url, project, "upgrade", target, MIGRATION_LOCK_TIMEOUT="1", MIGRATION_MAX_RETRIES="0"
    )

    assert read_state(pg_url).versions == [EXAMPLE_HEAD]
    if takes_lock:
        assert finished.returncode == 4, finished.output
        assert "without the command's own lock" not in finished.output
    else:
        assert finished.returncode == 0, finished.output
        assert f"Database is already at {EXAMPLE_HEAD}; running Alembic's" in finished.output
        assert "Acquiring " not in finished.output
