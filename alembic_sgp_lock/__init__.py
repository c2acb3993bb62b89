"""Run ``alembic upgrade head`` from many instances at once, safely."""

import importlib
from typing import TYPE_CHECKING, Any

from ._autogenerate import exclude_plugin_tables
from ._errors import (
    DdlLockTimeoutError,
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
from ._hook import run_migrations
from ._settings import Settings

if TYPE_CHECKING:
    from ._exit_codes import ExitCode
    from ._lock import migration_lock
    from ._marker import HalfAppliedMarker
    from ._preflight import DatabaseAheadError, Finding, PreflightError
    from ._recovery import clear_half_applied

    __version__: str

# Public names from modules that a run at head does not need with default
# settings. They are imported on first access, so that such a run starts
# sooner. Each name is the same object as in its own module.
_LAZY_NAMES = {
    "DatabaseAheadError": "._preflight",
    "ExitCode": "._exit_codes",
    "Finding": "._preflight",
    "HalfAppliedMarker": "._marker",
    "PreflightError": "._preflight",
    "clear_half_applied": "._recovery",
    "migration_lock": "._lock",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _installed_version()
    elif name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Later lookups find the name in the module and skip this function.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _installed_version() -> str:
    # version() parses the METADATA file with the email package, so it runs
    # only when __version__ is first read.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alembic-sgp-lock")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


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
