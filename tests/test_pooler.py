"""Migrations through a real PgBouncer in transaction and in session mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from alembic_sgp_lock import LockModeError
from alembic_sgp_lock._transaction_lock import reject_transaction_per_migration
from tests.conftest import POSTGRES_ADMIN_URL
from tests.pgbouncer import PgBouncer
from tests.support import EXAMPLE_HEAD, make_project, read_state, run_together

pytestmark = pytest.mark.postgresql


@pytest.fixture(scope="module")
def transaction_pooler() -> Iterator[PgBouncer]:
    bouncer = PgBouncer(POSTGRES_ADMIN_URL, "transaction")
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope="module")
def session_pooler() -> Iterator[PgBouncer]:
    bouncer = PgBouncer(POSTGRES_ADMIN_URL, "session")
    yield bouncer
    bouncer.stop()


def test_transaction_pooler_rejected(
    tmp_path: Path, pg_url: str, transaction_pooler: PgBouncer
) -> None:
    project = make_project(tmp_path, transaction_pooler.url_for(pg_url))

    finished = project.run("upgrade", "head")

    assert finished.returncode != 0
    assert "goes through a connection pooler in transaction mode" in finished.output
    assert "MIGRATION_DATABASE_URL" in finished.output
    assert "pool_mode = session" in finished.output
    assert "MIGRATION_LOCK_MODE=transaction" in finished.output
    assert "Acquired" not in finished.output
    assert read_state(pg_url).tables == set()


def test_direct_url_bypasses_pooler(
    tmp_path: Path, pg_url: str, transaction_pooler: PgBouncer
) -> None:
    project = make_project(tmp_path, transaction_pooler.url_for(pg_url))

    finished = project.run("upgrade", "head", MIGRATION_DATABASE_URL=pg_url)

    assert finished.returncode == 0, finished.output
    assert f"127.0.0.1:{transaction_pooler.port}" not in finished.output
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]


def test_session_pooler_accepted(tmp_path: Path, pg_url: str, session_pooler: PgBouncer) -> None:
    project = make_project(tmp_path, session_pooler.url_for(pg_url))

    results = run_together(project, 4)

    for returncode, output in results:
        assert returncode == 0, output
    outputs = "".join(output for _, output in results)
    assert "pooler in session mode" in outputs
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1


def test_transaction_lock_mode_through_pooler(
    tmp_path: Path, pg_url: str, transaction_pooler: PgBouncer
) -> None:
    project = make_project(tmp_path, transaction_pooler.url_for(pg_url))

    results = run_together(project, 6, MIGRATION_LOCK_MODE="transaction")

    for returncode, output in results:
        assert returncode == 0, output
    outputs = "".join(output for _, output in results)
    assert outputs.count("Running upgrade  -> 1a0c7e2b9d01") == 1
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1


AUTOCOMMIT_REVISION = """
op.create_table("before_block", sa.Column("id", sa.Integer, primary_key=True))
with op.get_context().autocommit_block():
    op.execute("SELECT 1")
"""


def test_transaction_lock_mode_rejects_autocommit_block(
    tmp_path: Path, pg_url: str, transaction_pooler: PgBouncer
) -> None:
    project = make_project(tmp_path, transaction_pooler.url_for(pg_url))
    project.add_revision("8b7c3d9e5f67", EXAMPLE_HEAD, AUTOCOMMIT_REVISION)

    finished = project.run("upgrade", "head", MIGRATION_LOCK_MODE="transaction")

    assert finished.returncode != 0
    assert "autocommit_block() would commit the migration transaction" in finished.output
    # Every revision ran in the one transaction, so all of them were rolled back.
    assert read_state(pg_url).tables == set()


def test_transaction_lock_mode_rejects_transaction_per_migration() -> None:
    with pytest.raises(LockModeError, match="transaction_per_migration=True commits"):
        reject_transaction_per_migration({"transaction_per_migration": True})
