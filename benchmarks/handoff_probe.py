"""One process of the hand-off benchmark: take the migration lock, hold it briefly, release it.

``--mode plugin`` goes through ``alembic_sgp_lock.migration_lock``, and its
acquisition and release times are those of the plugin's own "Acquired" and
"Released" log lines. ``--mode blocking`` waits in ``SELECT pg_advisory_lock``
inside a transaction, and ``--mode poll500`` tries ``pg_try_advisory_lock``
every 500 ms; both exist only for comparison.

The holder (``--role holder``) writes ``acquired`` in the sync folder once it
holds the lock and releases it when the file ``release`` appears. A waiter
writes ``ready-<pid>`` once it is waiting. Each process writes its times, read
from ``time.monotonic()`` (one system-wide clock on Linux), to ``--result``,
and exits once the file ``done`` appears.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alembic_sgp_lock import migration_lock
from alembic_sgp_lock._backend import lock_key_text
from alembic_sgp_lock._postgresql import lock_key

POLL_SECONDS = 0.5
LOCK_TIMEOUT = 300.0


class LogTimes(logging.Handler):
    """Record when the plugin logs that it waits for, acquired and released the lock."""

    def __init__(self, ready_file: Path | None) -> None:
        super().__init__(logging.INFO)
        self.ready_file = ready_file
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        message = record.getMessage()
        for prefix, name in (("Acquired ", "acquired"), ("Released ", "released")):
            if message.startswith(prefix):
                self.times[name] = now
        if message.startswith(("Acquiring ", "Waiting for ")):
            self.times.setdefault("waiting", now)
        if message.startswith("Waiting for ") and self.ready_file is not None:
            self.ready_file.touch()


@contextmanager
def plugin_lock(
    connection: Connection, times: dict[str, float], ready: Path | None
) -> Iterator[None]:
    handler = LogTimes(ready)
    logger = logging.getLogger("alembic.sgp_lock")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with migration_lock(connection, timeout=LOCK_TIMEOUT):
            yield
            times["body_end"] = time.monotonic()
    finally:
        logger.removeHandler(handler)
        times.update(handler.times)


@contextmanager
def blocking_lock(
    connection: Connection, times: dict[str, float], ready: Path | None
) -> Iterator[None]:
    key = lock_key(lock_key_text("alembic_version", None, None), None)
    times["waiting"] = time.monotonic()
    if ready is not None:
        ready.touch()
    # The transaction, and its snapshot, stays open while the statement waits.
    with connection.begin():
        connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
    times["acquired"] = time.monotonic()
    yield
    times["body_end"] = time.monotonic()
    with connection.begin():
        connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    times["released"] = time.monotonic()


@contextmanager
def polling_lock(
    connection: Connection, times: dict[str, float], ready: Path | None
) -> Iterator[None]:
    key = lock_key(lock_key_text("alembic_version", None, None), None)
    times["waiting"] = time.monotonic()
    while True:
        with connection.begin():
            acquired = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
            ).scalar()
        if acquired:
            break
        if ready is not None:
            ready.touch()
            ready = None
        time.sleep(POLL_SECONDS)
    times["acquired"] = time.monotonic()
    yield
    times["body_end"] = time.monotonic()
    with connection.begin():
        connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    times["released"] = time.monotonic()


LOCKS = {"plugin": plugin_lock, "blocking": blocking_lock, "poll500": polling_lock}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="database URL")
    parser.add_argument("--mode", choices=sorted(LOCKS), required=True)
    parser.add_argument("--role", choices=("holder", "waiter"), required=True)
    parser.add_argument("--sync-dir", type=Path, required=True, help="folder for signal files")
    parser.add_argument("--hold", type=float, default=0.02, help="seconds a waiter holds the lock")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the times")
    arguments = parser.parse_args()

    sync = arguments.sync_dir
    connect_args = {}
    if arguments.url.startswith("postgresql"):
        connect_args["application_name"] = f"sgp-bench-{arguments.role}"
    engine = sa.create_engine(arguments.url, poolclass=sa.pool.NullPool, connect_args=connect_args)
    times: dict[str, float] = {}
    ready = None if arguments.role == "holder" else sync / f"ready-{os.getpid()}"
    with engine.connect() as connection, LOCKS[arguments.mode](connection, times, ready):
        if arguments.role == "holder":
            (sync / "acquired").touch()
            release = sync / "release"
            while not release.exists():
                time.sleep(0.001)
        else:
            time.sleep(arguments.hold)
    arguments.result.write_text(json.dumps({"role": arguments.role, "times": times}))
    # Stay until every process of the round has had the lock: on 2 cores the
    # exit of the previous holder competed with the next waiter for the CPU.
    done = sync / "done"
    while not done.exists():
        time.sleep(0.1)
    engine.dispose()


if __name__ == "__main__":
    main()
