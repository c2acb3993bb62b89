"""Run ``alembic upgrade head`` from many instances at once, safely."""

from importlib.metadata import PackageNotFoundError, version

from ._errors import (
    DdlLockTimeoutError,
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
from ._hook import run_migrations
from ._lock import migration_lock
from ._settings import Settings

try:
    __version__ = version("alembic-sgp-lock")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DdlLockTimeoutError",
    "InvalidSettingError",
    "LockHolder",
    "LockModeError",
    "LockReleaseError",
    "LockTimeoutError",
    "MigrationInterruptedError",
    "MigrationLockError",
    "PoolerTransactionModeError",
    "RetriesExhaustedError",
    "Settings",
    "UnsupportedDialectError",
    "__version__",
    "migration_lock",
    "run_migrations",
]
