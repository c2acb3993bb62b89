"""Alembic projects on disk for tests: the example env.py and revisions, run as real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "alembic"
EXAMPLE_INI = REPO_ROOT / "alembic.ini"
EXAMPLE_HEAD = "3c2e9a4d1f23"
EXAMPLE_REVISIONS = ("1a0c7e2b9d01", "2b1d8f3c0e12", "3c2e9a4d1f23")
SETTING_VARIABLES = (
    "RUN_MIGRATIONS",
    "MIGRATION_MAX_RETRIES",
    "MIGRATION_LOCK_TIMEOUT",
    "MIGRATION_MAX_WAIT_TIME",
    "MIGRATION_RETRY_BACKOFF",
    "MIGRATION_LOCK",
    "MIGRATION_LOCK_NAME",
    "MIGRATION_DDL_LOCK_TIMEOUT",
    "MIGRATION_STATEMENT_TIMEOUT",
    "MIGRATION_DATABASE_URL",
    "MIGRATION_LOCK_MODE",
    "DATABASE_URL",
)

REVISION_TEMPLATE = '''\
"""{message}"""

import time

import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {down_revision!r}
branch_labels = None
depends_on = None


def upgrade():
{upgrade}


def downgrade():
{downgrade}
'''


@dataclass
class Project:
    """An Alembic project in a temporary folder that uses the example ``env.py``."""

    path: Path
    url: str

    @property
    def ini(self) -> Path:
        return self.path / "alembic.ini"

    def environment(self, **settings: str) -> dict[str, str]:
        """Return a process environment with only the given plugin settings set."""
        env = {key: value for key, value in os.environ.items() if key not in SETTING_VARIABLES}
        env["DATABASE_URL"] = self.url
        env.update(settings)
        return env

    def command(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "alembic", "-c", str(self.ini), *arguments]

    def start(self, *arguments: str, **settings: str) -> subprocess.Popen[str]:
        """Start ``alembic ARGUMENTS`` in the background."""
        return subprocess.Popen(
            self.command(*arguments),
            cwd=self.path,
            env=self.environment(**settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, *arguments: str, timeout: float = 120, **settings: str) -> Finished:
        """Run ``alembic ARGUMENTS`` to the end."""
        process = self.start(*arguments, **settings)
        output, _ = process.communicate(timeout=timeout)
        return Finished(process.returncode, output)

    def add_revision(
        self,
        revision: str,
        down_revision: str | None,
        upgrade: str,
        downgrade: str = "pass",
        message: str = "test revision",
    ) -> None:
        """Write a revision file whose upgrade() body is ``upgrade``."""
        text = REVISION_TEMPLATE.format(
            message=message,
            revision=revision,
            down_revision=down_revision,
            upgrade=textwrap.indent(textwrap.dedent(upgrade).strip(), "    "),
            downgrade=textwrap.indent(textwrap.dedent(downgrade).strip(), "    "),
        )
        (self.path / "migrations" / "versions" / f"{revision}_test.py").write_text(text)


def run_together(project: Project, count: int, **settings: str) -> list[tuple[int, str]]:
    """Start ``count`` ``alembic upgrade head`` processes at once; return statuses and outputs."""
    processes = [project.start("upgrade", "head", **settings) for _ in range(count)]
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=180)
        results.append((process.returncode, output))
    return results


@dataclass
class Finished:
    """Exit status and combined output of a finished process."""

    returncode: int
    output: str


def make_project(folder: Path, url: str, *, with_example_revisions: bool = True) -> Project:
    """Lay out an Alembic project in ``folder`` with the example env.py and revisions."""
    scripts = folder / "migrations"
    (scripts / "versions").mkdir(parents=True)
    shutil.copy(EXAMPLE_DIR / "env.py", scripts / "env.py")
    shutil.copy(EXAMPLE_DIR / "script.py.mako", scripts / "script.py.mako")
    if with_example_revisions:
        for revision_file in (EXAMPLE_DIR / "versions").glob("*.py"):
            shutil.copy(revision_file, scripts / "versions" / revision_file.name)
    ini = EXAMPLE_INI.read_text()
    ini = ini.replace("%(here)s/alembic\n", "%(here)s/migrations\n")
    ini = ini.replace("sqlite:///%(here)s/example.db", url.replace("%", "%%"))
    (folder / "alembic.ini").write_text(ini)
    return Project(folder, url)


@dataclass
class DatabaseState:
    """Database contents as read from a second connection."""

    tables: set[str]
    versions: list[str]
    customers: int | None


def read_state(url: str) -> DatabaseState:
    """Inspect the database from a new connection, separate from any migration."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            tables = set(sa.inspect(connection).get_table_names())
            versions: list[str] = []
            if "alembic_version" in tables:
                versions = list(
                    connection.execute(
                        sa.text("SELECT version_num FROM alembic_version")
                    ).scalars()
                )
            customers = None
            if "customer" in tables:
                customers = connection.execute(
                    sa.text("SELECT count(*) FROM customer WHERE name = 'first customer'")
                ).scalar_one()
        return DatabaseState(tables, versions, customers)
    finally:
        engine.dispose()


def postgres_lock_key(version_table: str = "alembic_version") -> int:
    """Return the advisory lock key the plugin derives for ``version_table``."""
    from alembic_sgp_lock._backend import lock_key_text
    from alembic_sgp_lock._postgresql import lock_key

    return lock_key(lock_key_text(version_table, None, None), None)
