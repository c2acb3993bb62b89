"""Run ``alembic upgrade head`` from many instances at once, safely."""

from importlib.metadata import PackageNotFoundError, version

from ._autogenerate import exclude_plugin_tables
from ._errors import (
    DdlLockTimeoutError,
    HalfAppliedMarker,
    HalfAppliedRevisionError,
    InvalidSettingError,
    LockHolder,
    LockModeError,
    LockReleaseError,
    LockTimeoutError,
    MigrationInterruptedError,
    MigrationLockError,
    PoolerTransactionModeError,
    RetriesExhaustedError,
    UnsupportedDialectError,
)
from ._exit_codes import ExitCode
from ._hook import run_migrations
from ._lock import migration_lock
from ._preflight import DatabaseAheadError, Finding, PreflightError
from ._recovery import clear_half_applied
from ._settings import Settings

try:
    __version__ = version("alembic-sgp-lock")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DatabaseAheadError",
    "DdlLockTimeoutError",
    "ExitCode",
    "Finding",
    "HalfAppliedMarker",
    "HalfAppliedRevisionError",
    "InvalidSettingError",
    "LockHolder",
    "LockModeError",
    "LockReleaseError",
    "LockTimeoutError",
    "MigrationInterruptedError",
    "MigrationLockError",
    "PoolerTransactionModeError",
    "PreflightError",
    "RetriesExhaustedError",
    "Settings",
    "UnsupportedDialectError",
    "__version__",
    "clear_half_applied",
    "exclude_plugin_tables",
    "migration_lock",
    "run_migrations",
]
