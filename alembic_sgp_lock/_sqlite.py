"""SQLite lock backend: an exclusive ``flock`` on a file beside the database file.

The kernel drops a ``flock`` when its process dies, so a killed migration
never leaves a stale lock. An in-memory database is private to its process,
so the in-process lock that every backend shares is all it needs.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import time
from collections.abc import Hashable

from sqlalchemy.engine import Connection

from ._errors import LockHolder

LOCK_FILE_SUFFIX = ".alembic-sgp-lock"
POLL_INTERVAL = (0.003, 0.015)


def database_path(connection: Connection) -> str | None:
    """Return the absolute path of the database file, or None for an in-memory database."""
    database = connection.engine.url.database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    if database.startswith("file:"):
        # A URI filename (sqlite:///file:path?mode=rwc&uri=true).
        database = database[len("file:") :].split("?", 1)[0]
        if "mode=memory" in (connection.engine.url.query.get("mode") or ""):
            return None
    return os.path.abspath(database)


class SqliteFileLock:
    """An exclusive ``flock`` on ``<database file>.alembic-sgp-lock``.

    The lock file is never deleted, because deleting it would let a new
    process lock a new file while an old one still holds the deleted inode.
    """

    def __init__(self, connection: Connection, key_text: str) -> None:
        path = database_path(connection)
        self.path = None if path is None else path + LOCK_FILE_SUFFIX
        if self.path is None:
            self.name = f"in-process lock for in-memory SQLite ({key_text})"
            self.identity: Hashable = ("sqlite-memory", id(connection.engine), key_text)
        else:
            self.name = f"sqlite lock file {self.path}"
            self.identity = ("sqlite", self.path)
        self._fd: int | None = None
        self._locked = False

    def try_acquire(self, connection: Connection) -> bool:
        if self.path is None:
            return True
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._locked = True
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode("utf-8"), 0)
        return True

    def wait(self, connection: Connection, seconds: float) -> None:
        time.sleep(min(seconds, random.uniform(*POLL_INTERVAL)))

    def stop_waiting(self, connection: Connection) -> None:
        # A descriptor opened for a lock that was never taken is closed here.
        if self._fd is not None and not self._locked:
            os.close(self._fd)
            self._fd = None

    def release(self, connection: Connection) -> bool:
        if self.path is None:
            return True
        if self._fd is None:
            return False
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
            self._locked = False
        return True

    def holder(self, connection: Connection) -> LockHolder | None:
        if self.path is None:
            return None
        try:
            with open(self.path, encoding="utf-8") as lock_file:
                content = lock_file.read()
        except FileNotFoundError:
            return None
        if not content:
            return LockHolder(description=f"a process that locked {self.path}")
        try:
            record = json.loads(content)
        except ValueError:
            return LockHolder(description=f"a process that locked {self.path}")
        since = record.get("since")
        held = max(0.0, time.time() - since) if isinstance(since, (int, float)) else None
        pid = record.get("pid")
        return LockHolder(
            pid=pid if isinstance(pid, int) else None,
            client_address=record.get("host"),
            held_seconds=held,
        )
