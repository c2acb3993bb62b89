"""Exit statuses of the ``alembic-sgp-lock`` command, one per kind of failure."""

from __future__ import annotations

import enum

from ._errors import (
    HalfAppliedRevisionError,
    InvalidSettingError,
    LockModeError,
    LockTimeoutError,
    PoolerTransactionModeError,
    RetriesExhaustedError,
    UnsupportedDialectError,
)
from ._preflight import DatabaseAheadError, InvalidConfigurationError, PreflightError


class ExitCode(enum.IntEnum):
    """Exit statuses of ``alembic-sgp-lock``; the values are part of the public interface."""

    #: The command succeeded.
    OK = 0
    #: Any other failure, including Alembic's own errors and failed SQL.
    FAILURE = 1
    #: The command line itself is invalid (argparse's status).
    USAGE = 2
    #: A ``MIGRATION_*`` setting, the database URL, the dialect or the pooler
    #: mode cannot be used.
    INVALID_CONFIGURATION = 3
    #: The migration lock was not acquired within ``MIGRATION_LOCK_TIMEOUT``.
    LOCK_TIMEOUT = 4
    #: Every attempt failed with a transient error.
    RETRIES_EXHAUSTED = 5
    #: A pre-flight check found an error, or a half-applied revision waits for
    #: repair; nothing was migrated.
    PREFLIGHT_FAILED = 6
    #: The database contains a revision that the migration scripts do not.
    DATABASE_AHEAD = 7


def exit_code_for(error: BaseException) -> ExitCode:
    """Return the exit status for an error that ended a command."""
    # Order matters: DatabaseAheadError is a PreflightError.
    if isinstance(error, DatabaseAheadError):
        return ExitCode.DATABASE_AHEAD
    if isinstance(error, (PreflightError, HalfAppliedRevisionError)):
        return ExitCode.PREFLIGHT_FAILED
    if isinstance(error, RetriesExhaustedError):
        # Waiting longer for a held lock is still a lock timeout to a deploy script.
        if isinstance(error.last_error, LockTimeoutError):
            return ExitCode.LOCK_TIMEOUT
        return ExitCode.RETRIES_EXHAUSTED
    if isinstance(error, LockTimeoutError):
        return ExitCode.LOCK_TIMEOUT
    if isinstance(
        error,
        (
            InvalidSettingError,
            UnsupportedDialectError,
            InvalidConfigurationError,
            PoolerTransactionModeError,
            LockModeError,
        ),
    ):
        return ExitCode.INVALID_CONFIGURATION
    return ExitCode.FAILURE
