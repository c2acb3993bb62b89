"""The SQLite lock file and the in-process lock, with real processes and threads."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from alembic_sgp_lock import LockTimeoutError, Settings, migration_lock
from tests.cli_support import run_cli
from tests.support import EXAMPLE_HEAD, make_project, read_state

SLEEP_BEFORE_DDL = """
time.sleep(float(__import__("os").environ.get("SLOW_REVISION_SECONDS", "0")))
op.create_table("slow_step", sa.Column("id", sa.Integer, primary_key=True))
"""


def lock_file_of(url: str) -> Path:
    return Path(sa.engine.make_url(url).database + ".alembic-sgp-lock")


def test_sixteen_processes_on_sqlite_file(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    processes = [project.start("upgrade", "head") for _ in range(16)]
    outputs = [process.communicate(timeout=180)[0] for process in processes]

    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    state = read_state(sqlite_url)
    assert {"alembic_version", "customer", "invoice"} <= state.tables
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    assert sum(output.count("Running upgrade  -> 1a0c7e2b9d01") for output in outputs) == 1


def test_killed_holder_frees_lock_file(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)
    project.add_revision("4d3f0b5e2a34", EXAMPLE_HEAD, SLEEP_BEFORE_DDL, message="slow step")
    holder = project.start("upgrade", "head", SLOW_REVISION_SECONDS="120")
    deadline = time.monotonic() + 30
    while read_state(sqlite_url).customers != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)

    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)
    # SQLite has no transactional DDL, so the killed revision is marked as
    # half applied. The next run gets the lock at once and stops on the marker.
    rejected = project.run("upgrade", "head", MIGRATION_LOCK_TIMEOUT="10")
    checked = run_cli(project, "preflight", "--format", "json")
    cleared = run_cli(project, "clear-half-applied")
    finished = project.run("upgrade", "head", MIGRATION_LOCK_TIMEOUT="10")

    assert rejected.returncode != 0
    assert "Timed out" not in rejected.output
    assert "Revision 4d3f0b5e2a34 (upgrade from 3c2e9a4d1f23" in rejected.output
    assert "alembic-sgp-lock clear-half-applied" in rejected.output
    assert checked.returncode == 6, checked.output
    codes = [finding["code"] for finding in json.loads(checked.stdout)["findings"]]
    assert codes == ["half-applied-revision"]
    assert cleared.returncode == 0, cleared.output
    assert "Cleared the half-applied marker of revision 4d3f0b5e2a34" in cleared.stdout
    assert finished.returncode == 0, finished.output
    state = read_state(sqlite_url)
    assert "slow_step" in state.tables
    assert state.versions == ["4d3f0b5e2a34"]


def test_lock_timeout_names_file_holder(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)
    lock_file = lock_file_of(sqlite_url)
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.write(descriptor, json.dumps({"pid": 424242, "host": "blocker-host", "since": 0}).encode())
    try:
        finished = project.run(
            "upgrade", "head", MIGRATION_LOCK_TIMEOUT="1", MIGRATION_MAX_RETRIES="0"
        )
    finally:
        os.close(descriptor)

    assert finished.returncode != 0
    assert (
        "Timed out after 1.0 s waiting for the migration lock sqlite lock file" in finished.output
    )
    assert "pid 424242" in finished.output
    assert "blocker-host" in finished.output
    assert read_state(sqlite_url).tables == set()


def test_zero_lock_timeout_does_not_wait(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)
    descriptor = os.open(lock_file_of(sqlite_url), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.write(descriptor, json.dumps({"pid": 424242, "host": "blocker-host", "since": 0}).encode())
    try:
        finished = project.run(
            "upgrade", "head", MIGRATION_LOCK_TIMEOUT="0", MIGRATION_MAX_RETRIES="0"
        )
    finally:
        os.close(descriptor)

    assert finished.returncode != 0
    assert "Waiting for" not in finished.output
    assert "Timed out" not in finished.output
    assert "was held by pid 424242" in finished.output
    assert "blocker-host" in finished.output
    assert "; not waiting, because the timeout is 0 s" in finished.output
    assert "this attempt did not wait for it because its timeout was 0 s" in finished.output
    assert read_state(sqlite_url).tables == set()


def test_lock_file_kept_after_release(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    lock_file = lock_file_of(sqlite_url)
    assert lock_file.exists()
    assert lock_file.read_text() == ""


def test_memory_database_serialises_threads() -> None:
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    settings = Settings.from_env({})
    inside = threading.Event()
    leave = threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        with engine.connect() as connection, migration_lock(connection, settings=settings):
            inside.set()
            leave.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    try:
        with engine.connect() as connection:
            with pytest.raises(LockTimeoutError) as raised:
                with migration_lock(connection, settings=settings, timeout=0.2):
                    errors.append(AssertionError("entered a lock held by another thread"))
    finally:
        leave.set()
        holder.join(10)

    assert errors == []
    assert "another thread of this process" in str(raised.value)
    with engine.connect() as connection, migration_lock(connection, settings=settings, timeout=1):
        pass


def test_migration_lock_rejects_open_transaction(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        transaction = connection.begin()
        connection.execute(sa.text("SELECT 1"))
        with pytest.raises(Exception, match="inside a transaction"):
            with migration_lock(connection, settings=Settings.from_env({})):
                pass
        transaction.rollback()
    engine.dispose()
