"""The migration lock: wait with a bounded timeout, hold it around the migration, release it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection

from . import _compat
from ._backend import LockBackend, backend_for
from ._errors import (
    LockReleaseError,
    LockTimeoutError,
    MigrationInterruptedError,
    MigrationLockError,
)
from ._log import logger
from ._process_lock import process_lock
from ._settings import Settings

# While waiting, a log line repeats the holder every this many seconds.
WAIT_REPORT_INTERVAL = 10.0
JUST_RELEASED = "a session that just released it"


def _end_open_transaction(connection: Connection, what: str) -> None:
    if connection.in_transaction():
        raise MigrationLockError(
            f"The connection passed to {what} is inside a transaction. Enter {what} before "
            "running any statement on the connection, or commit first: under SQLAlchemy 2.x "
            "Alembic would otherwise run every migration inside that transaction and never "
            "commit it."
        )


def _acquire(backend: LockBackend, connection: Connection, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the lock."""
    started = time.monotonic()
    logger.info("Acquiring %s (timeout %.1f s)", backend.name, timeout)
    failed = True
    try:
        if backend.try_acquire(connection):
            failed = False
            _log_acquired(backend, started)
            return
        holder = backend.holder(connection)
        if timeout <= 0:
            # MIGRATION_LOCK_TIMEOUT=0, or no time left of MIGRATION_MAX_WAIT_TIME.
            logger.info(
                "%s was held by %s; not waiting, because the timeout is 0 s",
                backend.name,
                holder or JUST_RELEASED,
            )
            raise LockTimeoutError(
                backend.name, time.monotonic() - started, holder, timeout_seconds=0.0
            )
        logger.info("Waiting for %s, held by %s", backend.name, holder or JUST_RELEASED)
        try:
            _wait_and_acquire(backend, connection, started, timeout)
        except MigrationInterruptedError as error:
            raise MigrationInterruptedError(
                error.signal_name, error.signal_number, waiting=True
            ) from None
        failed = False
    finally:
        # After the "Acquired" line, so that its time is the moment of the
        # acquisition and not of this clean-up's round trip.
        try:
            backend.stop_waiting(connection)
        except Exception:
            # Keep the error that ended the wait, such as a lost connection.
            if not failed:
                raise
            logger.debug("Could not stop waiting for %s", backend.name, exc_info=True)


def _wait_and_acquire(
    backend: LockBackend, connection: Connection, started: float, timeout: float
) -> None:
    """Wait for a release and try again until the lock is taken or ``timeout`` runs out."""
    give_up_at = started + timeout
    next_report = started + WAIT_REPORT_INTERVAL
    while True:
        now = time.monotonic()
        if now >= give_up_at:
            holder = backend.holder(connection)
            raise LockTimeoutError(backend.name, now - started, holder, timeout_seconds=timeout)
        if now >= next_report:
            holder = backend.holder(connection)
            logger.info(
                "Still waiting for %s after %.1f s, held by %s",
                backend.name,
                now - started,
                holder or JUST_RELEASED,
            )
            next_report = now + WAIT_REPORT_INTERVAL
        backend.wait(connection, give_up_at - now)
        if backend.try_acquire(connection):
            _log_acquired(backend, started)
            return


def _log_acquired(backend: LockBackend, started: float) -> None:
    logger.info("Acquired %s after %.2f s", backend.name, time.monotonic() - started)


def _release(backend: LockBackend, connection: Connection, held_since: float) -> None:
    try:
        released = backend.release(connection)
    except BaseException:
        logger.error("Releasing %s failed; closing the connection to free it", backend.name)
        connection.invalidate()
        raise
    held = time.monotonic() - held_since
    if not released:
        logger.error("%s was not held at release; closing the connection", backend.name)
        connection.invalidate()
        raise LockReleaseError(backend.name)
    logger.info("Released %s after holding it %.2f s", backend.name, held)


@contextmanager
def hold_lock(
    connection: Connection,
    *,
    settings: Settings,
    version_table: str,
    version_table_schema: str | None,
    timeout: float,
) -> Iterator[None]:
    """Hold the migration lock for the body, with the wait bounded by ``timeout`` seconds."""
    backend = backend_for(
        connection,
        version_table=version_table,
        version_table_schema=version_table_schema,
        lock_name=settings.lock_name,
    )
    started = time.monotonic()
    with process_lock(backend.identity, backend.name, timeout) as took_process_lock:
        if not took_process_lock:
            logger.info("%s is already held by this process; not locking again", backend.name)
            yield
            return
        remaining = max(0.0, timeout - (time.monotonic() - started))
        _acquire(backend, connection, remaining)
        held_since = time.monotonic()
        try:
            yield
            commit_open_transaction(connection)
        except BaseException:
            try:
                _release(backend, connection, held_since)
            except Exception:
                logger.exception("Could not release %s after a failed migration", backend.name)
            raise
        _release(backend, connection, held_since)


def commit_open_transaction(connection: Connection) -> None:
    """Commit a transaction that Alembic or ``env.py`` left open on the connection.

    Under SQLAlchemy 2.x such a transaction would be rolled back when the
    connection closes, and every migration in it lost.
    """
    transaction = connection.get_transaction()
    if transaction is not None and transaction.is_active:
        transaction.commit()


@contextmanager
def migration_lock(
    connection: Connection,
    *,
    settings: Settings | None = None,
    version_table: str = "alembic_version",
    version_table_schema: str | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """Hold the migration lock on ``connection`` while the body runs Alembic's migrations.

    For a hand-written ``env.py``: enter it right after ``connect()`` and before
    ``context.configure()``. Commands that do not write the version table
    (``current``, ``check``, ``heads``) run without the lock.

    :param connection: the connection that will run the migrations; it must not
        be inside a transaction.
    :param settings: defaults to :meth:`Settings.from_env`.
    :param version_table: the ``version_table`` given to ``context.configure``.
    :param version_table_schema: the ``version_table_schema`` given to it.
    :param timeout: seconds to wait for the lock; defaults to
        ``MIGRATION_LOCK_TIMEOUT``.
    :raises LockTimeoutError: the lock was not acquired in time.
    :raises LockReleaseError: the server reports the lock was not held at release.
    :raises UnsupportedDialectError: the database has no lock backend.
    """
    settings = settings if settings is not None else Settings.from_env()
    if not settings.lock_enabled:
        logger.warning("MIGRATION_LOCK is false: running migrations without a lock")
        yield
        return
    if not _compat.command_writes_version_table(_compat.current_environment()):
        logger.debug("This Alembic command does not write the version table; not locking")
        yield
        return
    _end_open_transaction(connection, "migration_lock()")
    with hold_lock(
        connection,
        settings=settings,
        version_table=version_table,
        version_table_schema=version_table_schema,
        timeout=settings.lock_timeout if timeout is None else timeout,
    ):
        yield
