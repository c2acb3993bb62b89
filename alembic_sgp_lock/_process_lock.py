"""The in-process lock that serialises migration runs on one database within a process.

Alembic is not thread-safe, and two connections of one process would also
contend for a database lock, so every lock first goes through here. A thread
that already holds a lock gets a nested, no-op entry, so that a command that
locks around Alembic and an ``env.py`` that locks again never wait for
themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from ._errors import LockHolder, LockTimeoutError


class _OwnedLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None


_registry_guard = threading.Lock()
_registry: dict[Hashable, _OwnedLock] = {}


def _lock_for(identity: Hashable) -> _OwnedLock:
    with _registry_guard:
        return _registry.setdefault(identity, _OwnedLock())


def held_by_current_thread(identity: Hashable) -> bool:
    """Tell whether this thread holds the in-process lock for ``identity``."""
    return _lock_for(identity).owner == threading.get_ident()


@contextmanager
def process_lock(identity: Hashable, lock_name: str, timeout: float) -> Iterator[bool]:
    """Hold the in-process lock for ``identity``; yield False on a nested entry.

    Yields True when this entry took the lock, False when the current thread
    already held it. Raises LockTimeoutError when another thread keeps it
    longer than ``timeout`` seconds.
    """
    owned = _lock_for(identity)
    me = threading.get_ident()
    if owned.owner == me:
        yield False
        return
    started = time.monotonic()
    if not owned.lock.acquire(timeout=max(timeout, 0.0)):
        raise LockTimeoutError(
            lock_name,
            time.monotonic() - started,
            LockHolder(description="another thread of this process"),
            timeout_seconds=max(timeout, 0.0),
        )
    owned.owner = me
    try:
        yield True
    finally:
        owned.owner = None
        owned.lock.release()
