"""Databases, Alembic projects and timed processes shared by the benchmark sections."""

from __future__ import annotations

import compileall
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support import (  # noqa: E402
    SETTING_VARIABLES,
    Project,
    make_project,
)
from tests.support import read_state as read_state  # noqa: E402  (re-exported for run.py)

POSTGRES_ADMIN_URL = os.environ.get(
    "POSTGRES_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
DATABASE_PREFIX = "sgp_bench_"

# Alembic's generic env.py, reduced to the online and offline branches. It is
# the baseline: what a project runs before it adopts the plugin.
PLAIN_ENV_PY = '''\
"""Alembic environment without any lock, as Alembic's generic template lays it out."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
'''

# Five revisions of the kind an application starts with. The last inserts a
# row under a unique constraint, so a second run of it fails instead of
# duplicating the row.
FIVE_REVISIONS: tuple[tuple[str, str], ...] = (
    (
        "b0000000001a",
        """
        op.create_table(
            "account",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("email", sa.String(200), nullable=False, unique=True),
        )
        """,
    ),
    (
        "b0000000002b",
        """
        op.create_table(
            "project",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("account_id", sa.Integer, sa.ForeignKey("account.id"), nullable=False),
            sa.Column("name", sa.String(100), nullable=False),
        )
        op.create_index("ix_project_account_id", "project", ["account_id"])
        """,
    ),
    ("b0000000003c", 'op.add_column("account", sa.Column("display_name", sa.String(100)))'),
    (
        "b0000000004d",
        """
        op.create_table(
            "audit_event",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("kind", sa.String(40), nullable=False),
        )
        """,
    ),
    (
        "b0000000005e",
        "op.execute(\"INSERT INTO account (id, email) VALUES (1, 'a@example.org')\")",
    ),
)
FIVE_HEAD = FIVE_REVISIONS[-1][0]
FIVE_TABLES = frozenset({"account", "project", "audit_event", "alembic_version"})

VARIANTS = ("plain", "plugin")


@dataclass
class ProcessResult:
    """One finished process: exit status, wall time, peak memory and where its output is."""

    returncode: int
    seconds: float
    max_rss_kib: int
    cpu_seconds: float
    output_path: Path

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")


def clean_environment() -> dict[str, str]:
    """Return the environment for benchmarked processes.

    Plugin settings and DATABASE_URL are removed, and so is
    PYTHONDONTWRITEBYTECODE: with it, every process would compile the revision
    files and an editable install's source again, which an installed wheel
    never does. The warm-up runs then leave bytecode, as Python does by default.
    """
    excluded = {*SETTING_VARIABLES, "PYTHONDONTWRITEBYTECODE"}
    return {key: value for key, value in os.environ.items() if key not in excluded}


def compile_package() -> None:
    """Write the plugin's bytecode, as installing its wheel does."""
    import alembic_sgp_lock

    compileall.compile_dir(Path(alembic_sgp_lock.__file__).parent, quiet=1)


def _reap(process: subprocess.Popen[bytes]) -> tuple[int, int, float]:
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux.
    return process.returncode, int(usage.ru_maxrss), usage.ru_utime + usage.ru_stime


class ProcessGroup:
    """Processes started back to back and reaped with ``wait4``, killed after a deadline."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.started = 0.0

    def start(self, command: Sequence[str], cwd: Path, output_path: Path) -> None:
        if not self.processes:
            self.started = time.perf_counter()
        with open(output_path, "wb") as output:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=clean_environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.processes.append((process, output_path))

    def wait(self) -> tuple[float, list[ProcessResult]]:
        """Reap every process; return the seconds from the first start to the last exit."""
        timer = threading.Timer(self.timeout, self.kill)
        timer.start()
        try:
            reaped = [(_reap(process), path) for process, path in self.processes]
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - self.started
        results = [
            ProcessResult(returncode, elapsed, max_rss, cpu, path)
            for (returncode, max_rss, cpu), path in reaped
        ]
        return elapsed, results

    def kill(self) -> None:
        for process, _ in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)


def run_one(command: Sequence[str], cwd: Path, output_path: Path, timeout: float) -> ProcessResult:
    """Run one process to the end and measure it."""
    group = ProcessGroup(timeout)
    group.start(command, cwd, output_path)
    elapsed, (result,) = group.wait()
    result.seconds = elapsed
    return result


def alembic_command(project: Project, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "alembic", "-c", str(project.ini), *arguments]


def build_project(
    folder: Path, url: str, variant: str, revisions: Sequence[tuple[str, str]]
) -> Project:
    """Lay out an Alembic project with the plugin's env.py or the plain one."""
    project = make_project(folder, url, with_example_revisions=False)
    if variant == "plain":
        (project.path / "migrations" / "env.py").write_text(PLAIN_ENV_PY)
    down: str | None = None
    for revision, upgrade in revisions:
        project.add_revision(revision, down, upgrade, message=f"benchmark revision {revision}")
        down = revision
    return project


def linear_history(count: int) -> list[tuple[str, str]]:
    """Return ``count`` linear revisions: the first creates a table, the rest do nothing."""
    revisions = [(f"c{1:011x}", 'op.create_table("item", sa.Column("id", sa.Integer))')]
    revisions += [(f"c{number:011x}", "pass") for number in range(2, count + 1)]
    return revisions


class Databases:
    """PostgreSQL databases and SQLite files made for one run, all removed by :meth:`close`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.admin = sa.create_engine(
            POSTGRES_ADMIN_URL, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
        )
        self.created: list[str] = []

    def new(self, backend: str) -> str:
        """Create an empty database on ``backend`` (postgresql or sqlite); return its URL."""
        name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
        if backend == "sqlite":
            return f"sqlite:///{self.folder / (name + '.db')}"
        with self.admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)

    def drop(self, url: str) -> None:
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            for suffix in ("", ".alembic-sgp-lock", "-journal"):
                Path(str(parsed.database) + suffix).unlink(missing_ok=True)
            return
        name = str(parsed.database)
        with self.admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.created:
            self.created.remove(name)

    def server_version(self) -> str:
        with self.admin.connect() as connection:
            return str(connection.execute(sa.text("SHOW server_version")).scalar())

    def close(self) -> None:
        for name in list(self.created):
            try:
                with self.admin.connect() as connection:
                    connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except sa.exc.SQLAlchemyError as error:
                print(f"could not drop benchmark database {name}: {error}", file=sys.stderr)
        self.created.clear()
        self.admin.dispose()


@contextmanager
def workspace() -> Iterator[tuple[Path, Databases]]:
    """Yield a temporary folder and a database factory; remove both afterwards."""
    with tempfile.TemporaryDirectory(prefix="sgp-bench-") as folder:
        databases = Databases(Path(folder))
        try:
            yield Path(folder), databases
        finally:
            databases.close()


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Return the count, median, quartiles, extremes and p99 (nearest rank) of ``values``."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    if len(ordered) >= 2:
        p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        p25 = p75 = ordered[0]
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p25": p25,
        "p75": p75,
        "p99": ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)],
        "min": ordered[0],
        "max": ordered[-1],
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]
