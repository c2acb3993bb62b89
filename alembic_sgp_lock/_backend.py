"""The interface every lock backend implements, and the choice of backend per dialect."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import Protocol

from sqlalchemy.engine import Connection

from ._errors import LockHolder, UnsupportedDialectError


class LockBackend(Protocol):
    """A migration lock on one database, driven from the migration connection."""

    #: Human-readable name used in every log line and error about this lock.
    name: str
    #: Key of the in-process lock that guards this database within one process.
    identity: Hashable

    def try_acquire(self, connection: Connection) -> bool:
        """Take the lock without waiting; return whether it was taken."""

    def wait(self, connection: Connection, seconds: float) -> None:
        """Block up to ``seconds``, returning early when the lock may have been released."""

    def stop_waiting(self, connection: Connection) -> None:
        """Undo whatever :meth:`wait` set up on the connection."""

    def release(self, connection: Connection) -> bool:
        """Release the lock; return whether the server confirms this session held it."""

    def holder(self, connection: Connection) -> LockHolder | None:
        """Describe the session that holds the lock now, or return None when it is free."""


def lock_key_text(
    version_table: str, version_table_schema: str | None, lock_name: str | None
) -> str:
    """Return the text that names this migration lock, before hashing."""
    if lock_name is not None:
        return lock_name
    schema = version_table_schema or ""
    return f"alembic-sgp-lock:{schema}.{version_table}"


def stable_hash64(text: str) -> int:
    """Hash ``text`` to a signed 64-bit integer that is the same on every platform and release."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def backend_for(
    connection: Connection,
    *,
    version_table: str,
    version_table_schema: str | None,
    lock_name: str | None,
) -> LockBackend:
    """Return the lock backend for the connection's dialect.

    Raises :class:`UnsupportedDialectError` for a dialect with no backend.
    """
    dialect = connection.dialect.name
    key_text = lock_key_text(version_table, version_table_schema, lock_name)
    if dialect == "postgresql":
        from ._postgresql import PostgresAdvisoryLock

        return PostgresAdvisoryLock(connection, key_text, explicit_name=lock_name)
    if dialect in ("mysql", "mariadb"):
        from ._mysql import MysqlUserLock

        return MysqlUserLock(
            connection,
            version_table=version_table,
            version_table_schema=version_table_schema,
            explicit_name=lock_name,
        )
    if dialect == "sqlite":
        from ._sqlite import SqliteFileLock

        return SqliteFileLock(connection, key_text)
    raise UnsupportedDialectError(dialect)
