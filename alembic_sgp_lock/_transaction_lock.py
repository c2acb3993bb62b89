"""MIGRATION_LOCK_MODE=transaction: one transaction-scoped advisory lock around all revisions.

For migrations that must go through a pooler in transaction mode. The lock,
the re-read of the version table and every revision share one transaction,
and ``pg_advisory_xact_lock`` ends with it, so nothing may commit in between:
``transaction_per_migration`` and ``autocommit_block()`` are rejected. The
wait for the lock keeps that transaction, and so a server connection, open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ._backend import lock_key_text
from ._errors import LockModeError, LockTimeoutError
from ._log import logger
from ._process_lock import process_lock
from ._session import (
    LOCK_NOT_AVAILABLE,
    dead_client_parameters,
    set_parameters,
    sqlstate,
    timeout_parameters,
    translate_timeout,
)
from ._settings import Settings

REJECTED_AUTOCOMMIT = (
    "autocommit_block() would commit the migration transaction and with it release the "
    "transaction-scoped lock of MIGRATION_LOCK_MODE=transaction. Run this revision through "
    "a direct connection with the default MIGRATION_LOCK_MODE=session."
)


def reject_transaction_per_migration(configure_options: dict[str, Any]) -> None:
    """Raise :class:`LockModeError` when the options would commit after each revision."""
    if configure_options.get("transaction_per_migration"):
        raise LockModeError(
            "transaction_per_migration=True commits after each revision, which would release "
            "the transaction-scoped lock of MIGRATION_LOCK_MODE=transaction after the first "
            "one. Remove transaction_per_migration, or use MIGRATION_LOCK_MODE=session."
        )


def migrate_in_one_transaction(
    connection: Connection,
    *,
    settings: Settings,
    version_table: str,
    version_table_schema: str | None,
    timeout: float,
    migrate: Callable[[Connection], None],
) -> None:
    """Take the transaction-scoped lock and call ``migrate`` in the same transaction.

    :raises LockTimeoutError: the lock was not acquired within ``timeout`` seconds.
    :raises DdlLockTimeoutError: a revision waited longer than ``MIGRATION_DDL_LOCK_TIMEOUT``.
    """
    if connection.dialect.name != "postgresql":
        raise LockModeError(
            f"MIGRATION_LOCK_MODE=transaction needs PostgreSQL, not {connection.dialect.name!r}; "
            "unset it to use the session-level lock."
        )
    from ._postgresql import PostgresAdvisoryLock

    backend = PostgresAdvisoryLock(
        connection,
        lock_key_text(version_table, version_table_schema, settings.lock_name),
        explicit_name=settings.lock_name,
    )
    name = f"transaction-scoped {backend.name}"
    started = time.monotonic()
    with process_lock(backend.identity, name, timeout):
        logger.info("Acquiring %s (timeout %.1f s)", name, timeout)
        try:
            with connection.begin():
                # Local settings end with the transaction, so none reaches another client.
                set_parameters(connection, dead_client_parameters(connection), local=True)
                previous_lock_timeout = str(connection.execute(text("SHOW lock_timeout")).scalar())
                wait_ms = str(max(1, round(timeout * 1000)))
                set_parameters(connection, {"lock_timeout": wait_ms}, local=True)
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": backend.key}
                )
                logger.info("Acquired %s after %.2f s", name, time.monotonic() - started)
                set_parameters(connection, {"lock_timeout": previous_lock_timeout}, local=True)
                set_parameters(connection, timeout_parameters(settings), local=True)
                held_since = time.monotonic()
                migrate(connection)
        except sa_exc.DBAPIError as error:
            if "pg_advisory_xact_lock" in str(error.statement or ""):
                if sqlstate(error) != LOCK_NOT_AVAILABLE:
                    raise
                holder = backend.holder(connection)
                raise LockTimeoutError(
                    name, time.monotonic() - started, holder, timeout_seconds=timeout
                ) from error
            raise translate_timeout(connection, settings, error) from error
    logger.info(
        "Released %s at commit after holding it %.2f s", name, time.monotonic() - held_since
    )
