"""Exceptions raised by alembic-sgp-lock.

Every exception derives from :class:`MigrationLockError`, itself an Alembic
``CommandError``, so the stock ``alembic`` command prints ``FAILED: <message>``
instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alembic.util import CommandError

if TYPE_CHECKING:
    from ._marker import HalfAppliedMarker


@dataclass(frozen=True)
class LockHolder:
    """The database session that holds the migration lock, as far as the server reports it."""

    pid: int | None = None
    application_name: str | None = None
    client_address: str | None = None
    held_seconds: float | None = None
    description: str | None = None
    #: The statement the holder runs or ran last, where the server reports it.
    statement: str | None = None
    #: What ``pid`` counts: a process id, or MySQL's connection id.
    pid_label: str = "pid"

    def __str__(self) -> str:
        parts = []
        if self.pid is not None:
            parts.append(f"{self.pid_label} {self.pid}")
        if self.application_name:
            parts.append(f"application {self.application_name!r}")
        if self.client_address:
            parts.append(f"client {self.client_address}")
        if self.held_seconds is not None:
            parts.append(f"held for {self.held_seconds:.1f} s")
        if self.description:
            parts.append(self.description)
        return ", ".join(parts) if parts else "an unknown session"


# The command that clears a half-applied marker.
RECOVERY_COMMAND = "alembic-sgp-lock clear-half-applied"


class MigrationLockError(CommandError):
    """Root of every error that alembic-sgp-lock raises."""


class InvalidSettingError(MigrationLockError, ValueError):
    """A setting has a value that cannot be used."""

    def __init__(self, name: str, value: str, accepted: str) -> None:
        self.name = name
        self.value = value
        self.accepted = accepted
        super().__init__(f"{name}={value!r} is invalid: {accepted}")


class UnsupportedDialectError(MigrationLockError):
    """The database has no lock backend."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        super().__init__(
            f"alembic-sgp-lock has no migration lock for the {dialect!r} dialect; "
            "supported are postgresql, mysql, mariadb and sqlite. "
            "Set MIGRATION_LOCK=false to run migrations without a lock."
        )


class LockTimeoutError(MigrationLockError, TimeoutError):
    """The migration lock was not acquired within the allowed time."""

    def __init__(
        self,
        lock_name: str,
        waited_seconds: float,
        holder: LockHolder | None,
        *,
        timeout_seconds: float | None = None,
    ) -> None:
        self.lock_name = lock_name
        self.waited_seconds = waited_seconds
        self.holder = holder
        #: Seconds the attempt allowed for the wait, where known. At 0 it tried
        #: the lock once and did not wait.
        self.timeout_seconds = timeout_seconds
        if timeout_seconds == 0:
            summary = _not_waited(
                lock_name, holder, "this attempt did not wait for it because its timeout was 0 s"
            )
        else:
            summary = _timed_out(lock_name, holder, f"{waited_seconds:.1f} s")
        super().__init__(
            f"{summary}. Wait for that migration to finish, "
            "or raise MIGRATION_LOCK_TIMEOUT and MIGRATION_MAX_WAIT_TIME."
        )


def _held_by(holder: LockHolder | None) -> str:
    return str(holder) if holder is not None else "a session that has since released it"


def _timed_out(lock_name: str, holder: LockHolder | None, waited: str) -> str:
    return (
        f"Timed out after {waited} waiting for the migration lock {lock_name}, "
        f"held by {_held_by(holder)}"
    )


def _not_waited(lock_name: str, holder: LockHolder | None, outcome: str) -> str:
    return f"The migration lock {lock_name} was held by {_held_by(holder)}, and {outcome}"


def _lock_timeouts_summary(lock_timeouts: Sequence[LockTimeoutError]) -> str:
    """Describe the lock waits of all attempts, naming the holder seen by the last one.

    The last attempt alone can mislead, because its wait is cut to the time
    left of MIGRATION_MAX_WAIT_TIME, which may be none.
    """
    last = lock_timeouts[-1]
    if all(error.timeout_seconds == 0 for error in lock_timeouts):
        return _not_waited(
            last.lock_name, last.holder, "no attempt waited for it because each timeout was 0 s"
        )
    total = sum(error.waited_seconds for error in lock_timeouts)
    return _timed_out(last.lock_name, last.holder, f"{total:.1f} s in total")


class LockReleaseError(MigrationLockError):
    """The server reported that the migration lock was not held when it was released."""

    def __init__(self, lock_name: str) -> None:
        self.lock_name = lock_name
        super().__init__(
            f"Releasing the migration lock {lock_name} failed: the server reports that this "
            "session did not hold it. The connection was closed; check that migrations do not "
            "go through a pooler in transaction mode."
        )


class RetriesExhaustedError(MigrationLockError):
    """Every allowed attempt failed with a transient error."""

    def __init__(
        self,
        attempts: int,
        elapsed_seconds: float,
        last_error: BaseException,
        lock_timeouts: Sequence[LockTimeoutError] = (),
    ) -> None:
        """Build the message from the last error.

        :param lock_timeouts: the lock timeouts of all attempts, in order. When
            the last error is one, the message gives their total wait.
        """
        self.attempts = attempts
        self.elapsed_seconds = elapsed_seconds
        self.last_error = last_error
        #: Seconds that the attempts waited for the migration lock in total.
        self.lock_wait_seconds = sum(error.waited_seconds for error in lock_timeouts)
        summary = str(last_error).strip().splitlines()[0] if str(last_error).strip() else ""
        if isinstance(last_error, LockTimeoutError):
            summary = _lock_timeouts_summary(lock_timeouts or [last_error])
            advice = (
                "Another migration still holds the lock: wait for it to finish, or raise "
                "MIGRATION_LOCK_TIMEOUT and MIGRATION_MAX_WAIT_TIME."
            )
        else:
            advice = (
                "Check that the database is reachable, or raise MIGRATION_MAX_RETRIES and "
                "MIGRATION_MAX_WAIT_TIME."
            )
        #: The last error's type and first line, as the message and the log give it.
        self.summary = f"{type(last_error).__name__}: {summary.rstrip('.')}"
        super().__init__(
            f"Migration failed after {attempts} attempt(s) in {elapsed_seconds:.1f} s; "
            f"last error: {self.summary}. {advice}"
        )


class HalfAppliedRevisionError(MigrationLockError):
    """A previous run left a revision half applied; migrations wait for a manual repair."""

    def __init__(self, marker: HalfAppliedMarker, marker_table: str) -> None:
        self.marker = marker
        self.marker_table = marker_table
        super().__init__(_half_applied_message(marker, marker_table))


def _half_applied_message(marker: HalfAppliedMarker, marker_table: str) -> str:
    source = marker.source_revisions or "base"
    destination = marker.destination_revisions or "base"
    script = f", file {marker.script_path}" if marker.script_path else ""
    lines = [
        f"Revision {marker.revision} ({marker.direction} from {source} to {destination}"
        f"{script}) did not finish. It was started at "
        f"{marker.started_at:%Y-%m-%d %H:%M:%S} UTC by {marker.holder}. This database commits "
        "each DDL statement at once, so part of the revision may be applied while "
        f"{marker.version_table} still contains {source}.",
    ]
    if marker.error:
        lines.append(f"It failed with: {marker.error}")
    else:
        lines.append("The process stopped without reporting an error (killed or disconnected).")
    if marker.statements:
        lines.append(
            "Statements sent for this revision, in order; check which of them took effect:"
        )
        lines.extend(f"  {number}. {sql}" for number, sql in enumerate(marker.statements, 1))
        if marker.statement_count > len(marker.statements):
            hidden = marker.statement_count - len(marker.statements)
            lines.append(f"  ... and {hidden} more not recorded")
    else:
        lines.append(
            f"No statement of it was recorded, but any operation of its {marker.direction}() "
            "may have run."
        )
    finish_function = "upgrade()" if marker.direction == "upgrade" else "downgrade()"
    lines += [
        f"Migrations are rejected until the schema is repaired (marker in table {marker_table}).",
        "To recover:",
        f"  1. Compare the schema with {finish_function} of revision {marker.revision} and "
        "the statements above.",
        f"  2. Either undo what took effect, so that the schema matches {source}, and run "
        f"`{RECOVERY_COMMAND}`;",
        f"     or apply the rest of {finish_function} by hand and run "
        f"`{RECOVERY_COMMAND} --stamp {destination}`.",
        "  3. Run `alembic upgrade head` again.",
    ]
    return "\n".join(lines)


class DdlLockTimeoutError(MigrationLockError, TimeoutError):
    """A migration statement waited longer than ``MIGRATION_DDL_LOCK_TIMEOUT`` for a table lock.

    PostgreSQL cancelled the statement and rolled the revision back; the run
    retries it while the retry limits allow.
    """

    def __init__(self, timeout_seconds: float, statement: str | None, blockers: list[str]) -> None:
        self.timeout_seconds = timeout_seconds
        self.statement = statement
        self.blockers = blockers
        held_by = "; ".join(blockers) if blockers else "a session that has since finished"
        what = f"{statement!r}" if statement else "A migration statement"
        super().__init__(
            f"{what} waited more than MIGRATION_DDL_LOCK_TIMEOUT={timeout_seconds:g} s for a "
            f"table lock and was rolled back. Sessions holding table locks: {held_by}. End "
            "those transactions, or raise MIGRATION_DDL_LOCK_TIMEOUT."
        )


class PoolerTransactionModeError(MigrationLockError):
    """The migration connection goes through a pooler in transaction mode."""

    def __init__(self, url: str, evidence: str) -> None:
        self.url = url
        self.evidence = evidence
        super().__init__(
            f"The migration connection to {url} goes through a connection pooler in "
            f"transaction mode ({evidence}). There, a session-level lock would stay on a "
            "server connection that the pooler hands to other clients. Use one of: "
            "(1) MIGRATION_DATABASE_URL set to a URL that reaches PostgreSQL directly; "
            "(2) a pooler database in session mode (PgBouncer: pool_mode = session); "
            "(3) MIGRATION_LOCK_MODE=transaction, a transaction-scoped lock that runs all "
            "revisions in one transaction and rejects transaction_per_migration and "
            "autocommit_block()."
        )


class MigrationInterruptedError(MigrationLockError):
    """The process received SIGTERM or SIGINT and stopped the migration run."""

    def __init__(self, signal_name: str, signal_number: int, *, waiting: bool = False) -> None:
        self.signal_name = signal_name
        self.signal_number = signal_number
        #: True when the signal came while this process waited for the lock.
        self.waiting = waiting
        if waiting:
            message = (
                f"Stopped by {signal_name} while waiting for the migration lock; this process "
                "changed nothing. Run the upgrade again to finish."
            )
        else:
            message = (
                f"Stopped by {signal_name}. If this process held the migration lock, it was "
                "released, and a revision that was running was rolled back unless it had "
                "already committed. Run the upgrade again to finish."
            )
        super().__init__(message)


class LockModeError(MigrationLockError):
    """A migration feature cannot run under MIGRATION_LOCK_MODE=transaction."""
