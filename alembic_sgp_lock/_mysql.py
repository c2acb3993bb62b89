"""MySQL and MariaDB lock backend: a user-level lock (``GET_LOCK``) on the migration connection.

User-level lock names are server-wide, so the name includes the database
name. The MySQL reference manual (locking functions) limits names to 64
characters, and both manuals call names case-insensitive, but MariaDB 10.11.19
here treated 'Abc' and 'aBC' as two locks and accepted 65 characters.
:func:`lock_name` returns a name that means the same in every case.

The server frees the lock when the session ends, so a killed migration
never leaves a stale lock once the server notices the closed connection.

A waiter blocks inside ``GET_LOCK`` with a timeout of at most
:data:`WAIT_SLICE` seconds, outside any transaction. The server grants the
lock to a blocked waiter as soon as the holder releases it, so hand-off takes
no polling delay.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ._errors import LockHolder

MAX_LOCK_NAME_LENGTH = 64
# Hex digits of the blake2b digest appended to a shortened or case-folded name.
NAME_HASH_DIGITS = 16
# Seconds that one GET_LOCK call blocks. Short slices let the caller log
# progress and keep its deadline, and make the server end the wait of a
# killed waiter soon.
WAIT_SLICE = 1.0
STATEMENT_PREVIEW_CHARACTERS = 120


def lock_name(database: str, version_table: str, explicit_name: str | None) -> str:
    """Return the ``GET_LOCK`` name for the version table of ``database``.

    The name is lower case and at most 64 characters. When the readable form
    is longer or contains upper-case letters, it is cut and followed by a hash
    of the full text, so that two databases whose names differ only in case
    get different locks on MySQL too.
    """
    if explicit_name is not None:
        readable = f"alembic-sgp-lock:{database}:{explicit_name}"
    else:
        readable = f"alembic-sgp-lock:{database}.{version_table}"
    if len(readable) <= MAX_LOCK_NAME_LENGTH and readable == readable.lower():
        return readable
    digest = hashlib.blake2b(readable.encode("utf-8"), digest_size=NAME_HASH_DIGITS // 2)
    room = MAX_LOCK_NAME_LENGTH - NAME_HASH_DIGITS - 1
    return f"{readable.lower()[:room]}#{digest.hexdigest()}"


CONNECTION_ID = "connection id"


class MysqlUserLock:
    """``GET_LOCK``/``RELEASE_LOCK`` on the migration connection."""

    def __init__(
        self,
        connection: Connection,
        *,
        version_table: str,
        version_table_schema: str | None,
        explicit_name: str | None,
    ) -> None:
        database = version_table_schema
        if database is None:
            with connection.begin():
                database = connection.execute(text("SELECT DATABASE()")).scalar()
        # Without a default database the version table cannot be found either,
        # so the name only needs to be stable.
        self.lock_name = lock_name(database or "", version_table, explicit_name)
        self.name = f"mysql user lock {self.lock_name!r}"
        url = connection.engine.url
        self.identity: Hashable = ("mysql", url.host, url.port, self.lock_name)
        self._acquired_while_waiting = False

    def _get_lock(self, connection: Connection, seconds: float) -> bool:
        with connection.begin():
            result = connection.execute(
                text("SELECT GET_LOCK(:name, :seconds)"),
                {"name": self.lock_name, "seconds": seconds},
            ).scalar()
        # GET_LOCK returns 1 when taken, 0 on timeout and NULL on an error
        # such as the wait being killed.
        return result == 1

    def try_acquire(self, connection: Connection) -> bool:
        if self._acquired_while_waiting:
            self._acquired_while_waiting = False
            return True
        return self._get_lock(connection, 0)

    def wait(self, connection: Connection, seconds: float) -> None:
        # The lock taken here is reported by the caller's next try_acquire().
        self._acquired_while_waiting = self._get_lock(connection, min(seconds, WAIT_SLICE))

    def stop_waiting(self, connection: Connection) -> None:
        if self._acquired_while_waiting:
            # Taken by the last wait() but never reported: give it back.
            self._acquired_while_waiting = False
            self.release(connection)

    def release(self, connection: Connection) -> bool:
        with connection.begin():
            result = connection.execute(
                text("SELECT RELEASE_LOCK(:name)"), {"name": self.lock_name}
            ).scalar()
        # 1: released; 0: held by another session; NULL: not held by anyone.
        return result == 1

    def holder(self, connection: Connection) -> LockHolder | None:
        with connection.begin():
            session_id = connection.execute(
                text("SELECT IS_USED_LOCK(:name)"), {"name": self.lock_name}
            ).scalar()
            if session_id is None:
                return None
            # Without the PROCESS privilege the process list shows only this
            # user's sessions, so the row may be missing.
            row = connection.execute(
                text(
                    "SELECT USER, HOST, DB, COMMAND, TIME, STATE, LEFT(INFO, :preview) "
                    "FROM information_schema.PROCESSLIST WHERE ID = :id"
                ),
                {"id": session_id, "preview": STATEMENT_PREVIEW_CHARACTERS},
            ).first()
        if row is None:
            return LockHolder(
                pid=int(session_id),
                pid_label=CONNECTION_ID,
                description="not visible in the process list "
                "(seeing it needs the PROCESS privilege)",
            )
        user, host, database, command, seconds, state, statement = row
        details = [f"user {user!r}", f"database {database!r}"]
        # TIME counts seconds in the session's current command, not since it
        # took the lock, so it is reported as such rather than as held_seconds.
        details.append(f"{command} for {seconds} s")
        if state:
            details.append(f"state {state!r}")
        if statement:
            details.append(f"statement {' '.join(str(statement).split())!r}")
        return LockHolder(
            pid=int(session_id),
            pid_label=CONNECTION_ID,
            client_address=host or None,
            description=", ".join(details),
        )
