"""Concurrent `alembic upgrade head` processes against the real PostgreSQL server."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import (
    EXAMPLE_HEAD,
    EXAMPLE_REVISIONS,
    make_project,
    postgres_lock_key,
    read_state,
    run_together,
)
from tests.tcp_forwarder import TcpForwarder, free_port

pytestmark = pytest.mark.postgresql

EXAMPLE_TABLES = {"alembic_version", "customer", "invoice"}


def test_sixteen_processes_on_empty_database(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)

    results = run_together(project, 16)

    for returncode, output in results:
        assert returncode == 0, output
    state = read_state(pg_url)
    assert state.tables >= EXAMPLE_TABLES
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    applied = sum(output.count("Running upgrade  -> 1a0c7e2b9d01") for _, output in results)
    assert applied == 1
    # Every other instance left without running Alembic's migrations.
    skipped = [
        output
        for _, output in results
        if "nothing left to do" in output or "nothing to migrate" in output
    ]
    assert len(skipped) == 15


def test_sixteen_processes_one_revision_behind(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1]).returncode == 0
    assert read_state(pg_url).customers == 0

    results = run_together(project, 16)

    for returncode, output in results:
        assert returncode == 0, output
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    outputs = "".join(output for _, output in results)
    assert outputs.count(f"Running upgrade {EXAMPLE_REVISIONS[1]} -> {EXAMPLE_HEAD}") == 1


def test_single_run_commits_under_lock(tmp_path: Path, pg_url: str) -> None:
    # SQLAlchemy 2.x autobegin: a lock statement before context.configure()
    # would make Alembic run inside a transaction it never commits.
    project = make_project(tmp_path, pg_url)

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    assert "Acquired postgresql advisory lock" in finished.output
    state = read_state(pg_url)
    assert state.tables >= EXAMPLE_TABLES
    assert state.versions == [EXAMPLE_HEAD]


def test_database_at_head_skips_lock(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", "head").returncode == 0

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    assert "nothing to migrate, lock not taken" in finished.output
    assert "Acquiring" not in finished.output


def test_logs_appear_under_stock_logging(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)

    finished = project.run("upgrade", "head")

    lines = [line for line in finished.output.splitlines() if "[alembic.sgp_lock]" in line]
    messages = "\n".join(lines)
    assert "Connecting to" in messages
    assert "Acquired postgresql advisory lock" in messages
    assert "Revision before migrating: base" in messages
    assert f"Applied upgrade base -> {EXAMPLE_REVISIONS[0]} in" in messages
    assert f"Revision after migrating: {EXAMPLE_HEAD}" in messages
    assert "Released postgresql advisory lock" in messages
    assert "Migration run finished in" in messages


def test_password_never_logged(tmp_path: Path, pg_url: str) -> None:
    # The server trusts loopback, so any password connects and must stay hidden.
    url = sa.engine.make_url(pg_url).set(password="s3cret-pw-123")
    project = make_project(tmp_path, url.render_as_string(hide_password=False))

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    assert "s3cret-pw-123" not in finished.output
    assert "***" in finished.output


def hold_lock(url: str, application_name: str) -> tuple[sa.engine.Engine, sa.engine.Connection]:
    engine = sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        connect_args={"application_name": application_name},
        isolation_level="AUTOCOMMIT",
    )
    connection = engine.connect()
    acquired = connection.execute(
        sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": postgres_lock_key()}
    ).scalar()
    assert acquired is True
    return engine, connection


def test_lock_timeout_names_holder(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    engine, blocker = hold_lock(pg_url, "blocker-app")
    blocker_pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar()
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
    assert "Timed out after 2.0 s waiting for the migration lock" in finished.output
    assert f"pid {blocker_pid}" in finished.output
    assert "application 'blocker-app'" in finished.output
    assert "Giving up after 2 attempt(s)" in finished.output
    # Two waits of 2 s and one short delay, plus interpreter start-up.
    assert 4 <= elapsed < 30
    assert read_state(pg_url).tables == set()


def test_lock_timeout_reports_total_wait(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    engine, blocker = hold_lock(pg_url, "blocker-app")
    try:
        # A backoff of 10**6 s is cut to the end of MIGRATION_MAX_WAIT_TIME, so
        # the second attempt starts with no time left for its wait.
        finished = project.run(
            "upgrade",
            "head",
            MIGRATION_LOCK_TIMEOUT="2",
            MIGRATION_MAX_WAIT_TIME="3",
            MIGRATION_MAX_RETRIES="3",
            MIGRATION_RETRY_BACKOFF="1000000000",
        )
    finally:
        blocker.close()
        engine.dispose()

    assert finished.returncode != 0
    assert "(timeout 0.0 s)" in finished.output
    assert "not waiting, because the timeout is 0 s" in finished.output
    assert "after 0.0 s" not in finished.output
    failed = re.search(
        r"^FAILED: Migration failed after 2 attempt\(s\) in [0-9.]+ s; last error: "
        r"LockTimeoutError: Timed out after ([0-9.]+) s in total waiting for the "
        r"migration lock postgresql advisory lock .*$",
        finished.output,
        re.MULTILINE,
    )
    assert failed is not None, finished.output
    assert 2.0 <= float(failed.group(1)) < 3.0
    assert "application 'blocker-app'" in failed.group(0)
    assert read_state(pg_url).tables == set()


def test_zero_lock_timeout_does_not_wait(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    engine, blocker = hold_lock(pg_url, "blocker-app")
    blocker_pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    try:
        once = project.run(
            "upgrade", "head", MIGRATION_LOCK_TIMEOUT="0", MIGRATION_MAX_RETRIES="0"
        )
        retried = project.run(
            "upgrade",
            "head",
            MIGRATION_LOCK_TIMEOUT="0",
            MIGRATION_MAX_RETRIES="2",
            MIGRATION_RETRY_BACKOFF="10",
        )
    finally:
        blocker.close()
        engine.dispose()

    assert once.returncode != 0
    assert "Waiting for" not in once.output
    assert "Timed out" not in once.output
    assert (
        f"was held by pid {blocker_pid}, application 'blocker-app', client 127.0.0.1:"
        in once.output
    )
    assert "; not waiting, because the timeout is 0 s" in once.output
    assert "this attempt did not wait for it because its timeout was 0 s" in once.output
    assert retried.returncode != 0
    assert "Waiting for" not in retried.output
    assert "Timed out" not in retried.output
    assert retried.output.count("not waiting, because the timeout is 0 s") == 3
    assert "Migration failed after 3 attempt(s)" in retried.output
    assert "no attempt waited for it because each timeout was 0 s" in retried.output
    assert read_state(pg_url).tables == set()


def test_current_does_not_wait_for_lock(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", "head").returncode == 0
    engine, blocker = hold_lock(pg_url, "long-migration")
    try:
        finished = project.run("current", timeout=25, MIGRATION_LOCK_TIMEOUT="60")
    finally:
        blocker.close()
        engine.dispose()

    assert finished.returncode == 0, finished.output
    assert EXAMPLE_HEAD in finished.output
    assert "Acquiring" not in finished.output


SLOW_REVISION = """
op.create_table("slow_step", sa.Column("id", sa.Integer, primary_key=True))
time.sleep(float(__import__("os").environ.get("SLOW_REVISION_SECONDS", "0")))
"""


def wait_for_tagged_holder(url: str, timeout: float = 30) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                pid = connection.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name LIKE '%alembic-sgp-lock since%' "
                        "AND state = 'idle in transaction'"
                    )
                ).scalar()
            if pid is not None:
                return int(pid)
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise AssertionError("no migration took the lock in time")


def test_killed_holder_frees_lock(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    project.add_revision("4d3f0b5e2a34", EXAMPLE_HEAD, SLOW_REVISION, message="slow step")
    holder = project.start("upgrade", "head", SLOW_REVISION_SECONDS="120")
    wait_for_tagged_holder(pg_url)

    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)
    finished = project.run("upgrade", "head", MIGRATION_LOCK_TIMEOUT="30")

    assert finished.returncode == 0, finished.output
    state = read_state(pg_url)
    assert "slow_step" in state.tables
    assert state.versions == ["4d3f0b5e2a34"]
    assert state.customers == 1


CONCURRENT_INDEX_REVISION = """
time.sleep(1.5)
with op.get_context().autocommit_block():
    op.create_index(
        "ix_invoice_amount", "invoice", ["amount_cents"], postgresql_concurrently=True
    )
"""


def test_create_index_concurrently_with_waiters(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision("5e4a1c6f3b45", EXAMPLE_HEAD, CONCURRENT_INDEX_REVISION)

    results = run_together(project, 9)

    for returncode, output in results:
        assert returncode == 0, output
        assert "deadlock" not in output.lower()
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        valid = connection.execute(
            sa.text(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = 'ix_invoice_amount'"
            )
        ).scalar()
    engine.dispose()
    assert valid is True
    assert read_state(pg_url).versions == ["5e4a1c6f3b45"]


def test_server_unreachable_then_started(tmp_path: Path, pg_url: str) -> None:
    port = free_port()
    late_url = sa.engine.make_url(pg_url).set(host="127.0.0.1", port=port)
    project = make_project(tmp_path, late_url.render_as_string(hide_password=False))
    target = sa.engine.make_url(pg_url)
    process = project.start(
        "upgrade",
        "head",
        MIGRATION_MAX_RETRIES="20",
        MIGRATION_RETRY_BACKOFF="300",
        MIGRATION_MAX_WAIT_TIME="60",
    )
    time.sleep(3)
    forwarder = TcpForwarder(port, (target.host or "127.0.0.1", target.port or 5432))
    try:
        output, _ = process.communicate(timeout=90)
    finally:
        forwarder.close()

    assert process.returncode == 0, output
    assert "retrying in" in output
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]


def test_server_unreachable_gives_up_at_deadline(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere"
    project = make_project(tmp_path, url)

    started = time.monotonic()
    finished = project.run(
        "upgrade",
        "head",
        MIGRATION_MAX_RETRIES="1000",
        MIGRATION_RETRY_BACKOFF="200",
        MIGRATION_MAX_WAIT_TIME="4",
    )
    elapsed = time.monotonic() - started

    assert finished.returncode != 0
    assert "Giving up after" in finished.output
    assert "Check that the database is reachable" in finished.output
    # The deadline is 4 s; interpreter start-up and the last attempt add a little.
    assert elapsed < 12


def test_bad_sql_fails_without_retry(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    project.add_revision("6f5b2d7a4c56", EXAMPLE_HEAD, 'op.execute("SELEC broken")')

    finished = project.run("upgrade", "head", MIGRATION_MAX_RETRIES="5")

    assert finished.returncode != 0
    assert "syntax error" in finished.output
    assert "retrying" not in finished.output
    assert finished.output.count("(attempt ") == 1
    # One transaction for the whole upgrade: PostgreSQL rolls all of it back.
    assert read_state(pg_url).tables == set()


def test_run_migrations_false_skips(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)

    finished = project.run("upgrade", "head", RUN_MIGRATIONS="false")

    assert finished.returncode == 0, finished.output
    assert "RUN_MIGRATIONS is false" in finished.output
    assert read_state(pg_url).tables == set()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MIGRATION_LOCK_TIMEOUT", "abc"),
        ("MIGRATION_MAX_RETRIES", "-1"),
        ("MIGRATION_MAX_WAIT_TIME", ""),
        ("RUN_MIGRATIONS", "maybe"),
    ],
)
def test_invalid_setting_leaves_database_untouched(
    tmp_path: Path, pg_url: str, variable: str, value: str
) -> None:
    project = make_project(tmp_path, pg_url)

    finished = project.run("upgrade", "head", **{variable: value})

    assert finished.returncode != 0
    assert f"{variable}={value!r} is invalid" in finished.output
    assert "Connecting to" not in finished.output
    assert read_state(pg_url).tables == set()


def test_offline_mode_renders_sql_without_lock(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)

    finished = project.run("upgrade", "head", "--sql")

    assert finished.returncode == 0, finished.output
    assert "CREATE TABLE customer" in finished.output
    assert "INSERT INTO customer (id, name) VALUES (1, 'first customer')" in finished.output
    assert "Offline (--sql) mode" in finished.output
    assert "Acquiring" not in finished.output
    assert read_state(pg_url).tables == set()


def test_lost_lock_reported_at_release(tmp_path: Path, pg_url: str) -> None:
    # A revision that drops every advisory lock of its session, as a
    # transaction-mode pooler would by handing the session to someone else.
    project = make_project(tmp_path, pg_url)
    project.add_revision(
        "7a6c3e8b5d67", EXAMPLE_HEAD, 'op.execute("SELECT pg_advisory_unlock_all()")'
    )

    finished = project.run("upgrade", "head", MIGRATION_MAX_RETRIES="0")

    assert finished.returncode != 0
    assert "the server reports that this session did not hold it" in finished.output
    assert "The connection was closed" in finished.output
    assert read_state(pg_url).versions == ["7a6c3e8b5d67"]


def test_application_name_tagged_then_restored(pg_url: str) -> None:
    from alembic_sgp_lock import Settings, migration_lock

    long_name = "web-" + "x" * 56
    engine = sa.create_engine(
        pg_url, poolclass=sa.pool.NullPool, connect_args={"application_name": long_name}
    )
    observer = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            with connection.begin():
                pid = connection.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            seen = sa.text("SELECT application_name FROM pg_stat_activity WHERE pid = :pid")
            with migration_lock(connection, settings=Settings.from_env({})):
                with observer.connect() as other:
                    tagged = other.execute(seen, {"pid": pid}).scalar()
            with observer.connect() as other:
                restored = other.execute(seen, {"pid": pid}).scalar()
    finally:
        engine.dispose()
        observer.dispose()

    assert tagged.startswith("web-xxx")
    assert " [alembic-sgp-lock since " in tagged
    assert tagged.endswith("]")
    assert len(tagged) <= 63
    assert restored == long_name
