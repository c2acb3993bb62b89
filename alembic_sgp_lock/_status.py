"""Read whether the migration lock is locked now, and which session has it, without taking it."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.engine import Connection

from ._backend import LockBackend
from ._errors import LockHolder
from ._postgresql import PostgresAdvisoryLock, QueuedWaiter
from ._sqlite import SqliteFileLock


@dataclass(frozen=True)
class LockStatus:
    """The state of one migration lock at the moment it was read."""

    lock_name: str
    held: bool
    holder: LockHolder | None
    #: Sessions queued for the lock (PostgreSQL), or None where they cannot be listed.
    waiters: tuple[QueuedWaiter, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the status as a JSON-ready dictionary; ``since`` is ISO 8601 in UTC."""
        holder = None
        if self.holder is not None:
            holder = {
                "pid": self.holder.pid,
                "application_name": self.holder.application_name,
                "client_address": self.holder.client_address,
                "since": _since(self.holder),
                "held_seconds": self.holder.held_seconds,
                "statement": self.holder.statement,
                "description": self.holder.description,
            }
        waiters = None
        if self.waiters is not None:
            waiters = [
                {
                    "pid": waiter.pid,
                    "application_name": waiter.application_name,
                    "waiting_seconds": waiter.waiting_seconds,
                }
                for waiter in self.waiters
            ]
        return {"lock": self.lock_name, "held": self.held, "holder": holder, "waiters": waiters}

    def describe(self) -> str:
        """Return the status as lines of text, one line per field.

        Whitespace runs in the values, such as the line breaks of a statement,
        become single spaces. :meth:`as_dict` keeps the values unchanged.
        """
        if not self.held:
            return "\n".join([f"The migration lock is free: {self.lock_name}", *self._queue()])
        lines = [f"The migration lock is held: {self.lock_name}"]
        holder = self.holder or LockHolder()
        rows = [
            (holder.pid_label, holder.pid),
            ("application name", holder.application_name),
            ("client address", holder.client_address),
            ("since", _since(holder)),
            ("statement", holder.statement),
            ("details", holder.description),
        ]
        lines.extend(
            f"  {label}: {_one_line(value)}" for label, value in rows if value is not None
        )
        if holder.held_seconds is not None:
            lines.append(f"  held for: {holder.held_seconds:.1f} s")
        lines.extend(self._queue())
        return "\n".join(lines)

    def _queue(self) -> list[str]:
        if not self.waiters:
            return []
        lines = [f"Waiting in the queue: {len(self.waiters)}, longest waiting first"]
        for waiter in self.waiters:
            name = f" ({waiter.application_name})" if waiter.application_name else ""
            lines.append(f"  pid {waiter.pid}{name}: waiting {waiter.waiting_seconds:.1f} s")
        return lines


def _one_line(value: object) -> str:
    """Return ``value`` as text with each run of whitespace, line breaks included, as one space.

    A multi-line statement would otherwise break the indented layout.
    """
    return " ".join(str(value).split())


def _since(holder: LockHolder) -> str | None:
    if holder.held_seconds is None:
        return None
    since = datetime.now(timezone.utc) - timedelta(seconds=holder.held_seconds)
    return since.isoformat(timespec="seconds")


def read_lock_status(connection: Connection, backend: LockBackend) -> LockStatus:
    """Read whether ``backend``'s lock is held, without waiting and without holding it."""
    if isinstance(backend, SqliteFileLock):
        held = _sqlite_file_locked(backend)
        holder = backend.holder(connection) if held else None
        return LockStatus(backend.name, held, holder)
    holder = backend.holder(connection)
    waiters = None
    if isinstance(backend, PostgresAdvisoryLock):
        waiters = tuple(backend.queued_waiters(connection))
    return LockStatus(backend.name, holder is not None, holder, waiters)


def _sqlite_file_locked(backend: SqliteFileLock) -> bool:
    # The lock file stays in place after release, so its content cannot tell
    # whether it is locked; a non-blocking shared flock can. A migration that
    # tries to lock in those microseconds fails once and polls again. An
    # in-memory database is private to its process, so no other process can lock it.
    if backend.path is None or not os.path.exists(backend.path):
        return False
    descriptor = os.open(backend.path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return False
    finally:
        os.close(descriptor)
