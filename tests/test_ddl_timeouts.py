"""MIGRATION_DDL_LOCK_TIMEOUT and MIGRATION_STATEMENT_TIMEOUT against a real blocker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import EXAMPLE_HEAD, make_project, read_state

pytestmark = pytest.mark.postgresql

ADD_EMAIL = 'op.add_column("customer", sa.Column("email", sa.String(200)))'
ADD_EMAIL_REVISION = "9c8d4e0f6a78"


def column_names(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return {column["name"] for column in sa.inspect(connection).get_columns(table)}
    finally:
        engine.dispose()


class Blocker:
    """An application transaction that keeps reading ``customer`` open, holding its lock."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(
            url,
            poolclass=sa.pool.NullPool,
            connect_args={"application_name": "nightly-report"},
        )
        self.connection = self.engine.connect()
        # An explicit begin() keeps the transaction open in SQLAlchemy 1.4's legacy mode too.
        self.transaction = self.connection.begin()
        self.pid = self.connection.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        self.connection.execute(sa.text("SELECT count(*) FROM customer")).scalar()

    def end(self) -> None:
        self.transaction.rollback()
        self.connection.close()
        self.engine.dispose()


class ApplicationTraffic:
    """Reads of ``customer`` in a loop from another session, recording how long each took."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(
            url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
        )
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(sa.text("SET statement_timeout = '20s'"))
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    connection.execute(sa.text("SELECT count(*) FROM customer")).scalar()
                except sa.exc.DBAPIError as error:
                    self.errors.append(str(error.orig))
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.dispose()


def test_ddl_lock_timeout_retries_until_blocker_ends(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision(ADD_EMAIL_REVISION, EXAMPLE_HEAD, ADD_EMAIL)
    blocker = Blocker(pg_url)
    traffic = ApplicationTraffic(pg_url)
    try:
        migration = project.start(
            "upgrade",
            "head",
            MIGRATION_DDL_LOCK_TIMEOUT="0.5",
            MIGRATION_MAX_RETRIES="100",
            MIGRATION_RETRY_BACKOFF="200",
            MIGRATION_MAX_WAIT_TIME="90",
        )
        time.sleep(6)
        still_running = migration.poll() is None
        blocker.end()
        output, _ = migration.communicate(timeout=90)
    finally:
        traffic.stop()

    assert still_running, output
    assert migration.returncode == 0, output
    assert "email" in column_names(pg_url, "customer")
    assert read_state(pg_url).versions == [ADD_EMAIL_REVISION]
    assert "retrying in" in output
    assert f"pid {blocker.pid}" in output
    assert "application 'nightly-report'" in output
    assert "tables customer" in output
    # The ALTER TABLE never queued longer than its lock_timeout, so readers kept going.
    assert traffic.errors == []
    assert len(traffic.latencies) >= 30
    assert max(traffic.latencies) < 2.0


def test_ddl_lock_timeout_gives_up_at_deadline(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision(ADD_EMAIL_REVISION, EXAMPLE_HEAD, ADD_EMAIL)
    blocker = Blocker(pg_url)
    try:
        started = time.monotonic()
        finished = project.run(
            "upgrade",
            "head",
            MIGRATION_DDL_LOCK_TIMEOUT="0.5",
            MIGRATION_MAX_RETRIES="100",
            MIGRATION_RETRY_BACKOFF="200",
            MIGRATION_MAX_WAIT_TIME="5",
        )
        elapsed = time.monotonic() - started
    finally:
        blocker.end()

    assert finished.returncode != 0
    assert "Giving up after" in finished.output
    assert "waited more than MIGRATION_DDL_LOCK_TIMEOUT=0.5 s for a table lock" in finished.output
    assert f"pid {blocker.pid}" in finished.output
    assert "raise MIGRATION_DDL_LOCK_TIMEOUT" in finished.output
    # A 5 s deadline, one last 0.5 s wait and interpreter start-up.
    assert elapsed < 15
    assert "email" not in column_names(pg_url, "customer")
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]


RECORD_SETTINGS = """
names = (
    "lock_timeout",
    "statement_timeout",
    "client_connection_check_interval",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
)
op.execute("CREATE TABLE seen_setting (place text, name text, value text)")
for name in names:
    op.execute(
        f"INSERT INTO seen_setting VALUES ('transaction', '{name}', current_setting('{name}'))"
    )
with op.get_context().autocommit_block():
    op.execute(
        "INSERT INTO seen_setting VALUES "
        "('autocommit_block', 'lock_timeout', current_setting('lock_timeout'))"
    )
"""


def seen_settings(url: str) -> dict[tuple[str, str], str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT place, name, value FROM seen_setting"))
            return {(place, name): value for place, name, value in rows}
    finally:
        engine.dispose()


def test_session_settings_reach_revisions(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision("0d9e5f1a7b89", EXAMPLE_HEAD, RECORD_SETTINGS)

    finished = project.run(
        "upgrade",
        "head",
        MIGRATION_DDL_LOCK_TIMEOUT="2.5",
        MIGRATION_STATEMENT_TIMEOUT="60",
    )

    assert finished.returncode == 0, finished.output
    seen = seen_settings(pg_url)
    assert seen[("transaction", "lock_timeout")] == "2500ms"
    assert seen[("autocommit_block", "lock_timeout")] == "2500ms"
    assert seen[("transaction", "statement_timeout")] == "1min"
    assert seen[("transaction", "client_connection_check_interval")] == "5s"
    assert seen[("transaction", "tcp_keepalives_idle")] == "10"
    assert seen[("transaction", "tcp_keepalives_interval")] == "5"
    assert seen[("transaction", "tcp_keepalives_count")] == "3"
    assert seen[("transaction", "tcp_user_timeout")] == "30000"


def test_timeouts_off_by_default(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision("0d9e5f1a7b89", EXAMPLE_HEAD, RECORD_SETTINGS)

    finished = project.run("upgrade", "head")

    assert finished.returncode == 0, finished.output
    seen = seen_settings(pg_url)
    assert seen[("transaction", "lock_timeout")] == "0"
    assert seen[("transaction", "statement_timeout")] == "0"
    assert "Migrating with" not in finished.output


def test_statement_timeout_fails_without_retry(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", EXAMPLE_HEAD).returncode == 0
    project.add_revision("1e0f6a2b8c90", EXAMPLE_HEAD, 'op.execute("SELECT pg_sleep(30)")')

    started = time.monotonic()
    finished = project.run(
        "upgrade", "head", MIGRATION_STATEMENT_TIMEOUT="1", MIGRATION_MAX_RETRIES="5"
    )
    elapsed = time.monotonic() - started

    assert finished.returncode != 0
    assert "canceling statement due to statement timeout" in finished.output
    assert "MIGRATION_STATEMENT_TIMEOUT=1 s" in finished.output
    assert "retrying" not in finished.output
    assert elapsed < 20
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]
