"""Fixtures: a fresh database per test on the real servers, and Alembic projects on disk.

Server URLs come from ``POSTGRES_ADMIN_URL`` and ``MYSQL_ADMIN_URL``. When a
server is unreachable its tests fail under CI (``CI`` set) and skip elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import alembic
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

import alembic_sgp_lock

POSTGRES_ADMIN_URL = os.environ.get(
    "POSTGRES_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get("MYSQL_ADMIN_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def _unreachable(server: str, url: URL, error: Exception) -> None:
    message = f"{server} at {url.render_as_string(hide_password=True)} is unreachable: {error}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _server_version(url: str) -> str:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return str(connection.execute(sa.text("SELECT version()")).scalar())
    except Exception as error:
        return f"unreachable ({type(error).__name__})"
    finally:
        engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    # tox sets this so that a test run never passes on the source tree while
    # the built package is broken, for example by a file missing from the wheel.
    if os.environ.get("ALEMBIC_SGP_LOCK_TEST_INSTALLED"):
        package_dir = Path(alembic_sgp_lock.__file__).resolve().parent
        source_dir = Path(__file__).resolve().parents[1] / "alembic_sgp_lock"
        if package_dir == source_dir:
            raise pytest.UsageError(
                f"alembic_sgp_lock was imported from the source tree {package_dir}, but "
                "ALEMBIC_SGP_LOCK_TEST_INSTALLED requires the installed package; run the "
                "pytest script with --import-mode=append instead of python -m pytest"
            )


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"postgresql: {_server_version(POSTGRES_ADMIN_URL)}",
        f"mysql: {_server_version(MYSQL_ADMIN_URL)}",
        f"sqlalchemy: {sa.__version__}, alembic: {alembic.__version__}",
        f"alembic-sgp-lock: {alembic_sgp_lock.__version__} from {alembic_sgp_lock.__file__}",
    ]


def _fresh_database(server: str, admin_url_text: str, create: str, drop: str) -> Iterator[str]:
    """Create a database named by ``create``/``drop`` templates; yield its URL, then drop it."""
    admin_url = make_url(admin_url_text)
    name = f"sgp_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(create.format(name=name)))
    except sa.exc.OperationalError as error:
        admin.dispose()
        _unreachable(server, admin_url, error)
    yield admin_url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(sa.text(drop.format(name=name)))
    admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """Create a fresh PostgreSQL database; yield its URL and drop it afterwards."""
    yield from _fresh_database(
        "PostgreSQL",
        POSTGRES_ADMIN_URL,
        'CREATE DATABASE "{name}"',
        'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
    )


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """Create a fresh MariaDB/MySQL database; yield its URL and drop it afterwards."""
    yield from _fresh_database(
        "MariaDB", MYSQL_ADMIN_URL, "CREATE DATABASE `{name}`", "DROP DATABASE IF EXISTS `{name}`"
    )


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """Return the URL of a SQLite file in the test's temporary folder."""
    return f"sqlite:///{os.path.join(tmp_path, 'app.db')}"
