"""A hand-written env.py that wraps Alembic's own calls in migration_lock()."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import EXAMPLE_HEAD, make_project, read_state

HAND_WRITTEN_ENV = """
import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

from alembic_sgp_lock import migration_lock

fileConfig(context.config.config_file_name)

engine = sa.create_engine(os.environ["DATABASE_URL"], poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    with migration_lock(connection):
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
engine.dispose()
"""


@pytest.mark.postgresql
def test_eight_processes_with_context_manager(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    (project.path / "migrations" / "env.py").write_text(HAND_WRITTEN_ENV)

    processes = [project.start("upgrade", "head") for _ in range(8)]
    outputs = [process.communicate(timeout=180)[0] for process in processes]

    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    assert sum(output.count("Running upgrade  -> 1a0c7e2b9d01") for output in outputs) == 1
