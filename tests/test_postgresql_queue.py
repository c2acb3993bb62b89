"""The PostgreSQL waiters' queue: a release wakes the oldest waiter and no other.

These drive the lock backend directly on separate real connections, so that
one process can play the holder and several waiters, and read ``pg_locks``
from a further connection.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from alembic_sgp_lock._backend import lock_key_text
from alembic_sgp_lock._compat import dbapi_connection
from alembic_sgp_lock._postgresql import PostgresAdvisoryLock
from tests.support import EXAMPLE_HEAD, make_project, read_state, run_together

pytestmark = pytest.mark.postgresql

KEY_TEXT = lock_key_text("alembic_version", None, None)
# Long enough for a notification on loopback, short enough to keep the tests quick.
NOTIFY_SECONDS = 1.0


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def connections(engine: Engine) -> Iterator[list[Connection]]:
    """Four connections: a holder, two waiters and an observer."""
    with ExitStack() as stack:
        yield [stack.enter_context(engine.connect()) for _ in range(4)]


def join_queue(lock: PostgresAdvisoryLock, connection: Connection) -> None:
    """Fail one try, then make the first wait() call, which joins the queue."""
    assert not lock.try_acquire(connection)
    lock.wait(connection, 1.0)


def hold_and_queue_two(
    holder: Connection, first: Connection, second: Connection
) -> list[PostgresAdvisoryLock]:
    """Take the lock on ``holder``, then queue ``first`` and, 10 ms later, ``second``."""
    locks = [PostgresAdvisoryLock(holder, KEY_TEXT, None) for _ in range(3)]
    assert locks[0].try_acquire(holder)
    join_queue(locks[1], first)
    time.sleep(0.01)
    join_queue(locks[2], second)
    return locks


def tickets(observer: Connection, lock: PostgresAdvisoryLock) -> dict[int, int]:
    """Return {backend pid: ticket} of the sessions queued for ``lock`` in this database."""
    with observer.begin():
        rows = observer.execute(
            sa.text(
                "SELECT pid, objid FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
                "AND objsubid = 2 AND classid = CAST(:queue AS oid) AND granted "
                "AND database = (SELECT oid FROM pg_catalog.pg_database "
                "WHERE datname = current_database())"
            ),
            {"queue": lock.queue_key},
        ).all()
    return {int(pid): int(ticket) for pid, ticket in rows}


def backend_pid(connection: Connection) -> int:
    with connection.begin():
        return int(connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def notified(connection: Connection, seconds: float) -> bool:
    """Wait up to ``seconds`` for a notification on the connection; consume it."""
    driver_connection = dbapi_connection(connection)
    deadline = time.monotonic() + seconds
    while not driver_connection.notifies:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        readable, _, _ = select.select([driver_connection], [], [], remaining)
        if readable:
            driver_connection.poll()
    driver_connection.notifies.clear()
    return True


def test_waiters_queue_in_arrival_order(connections: list[Connection]) -> None:
    holder, first, second, observer = connections

    locks = hold_and_queue_two(holder, first, second)

    queued = tickets(observer, locks[0])
    assert set(queued) == {backend_pid(first), backend_pid(second)}
    assert queued[backend_pid(first)] <= queued[backend_pid(second)]
    assert locks[0].release(holder)


def test_release_wakes_only_the_oldest_waiter(connections: list[Connection]) -> None:
    holder, first, second, observer = connections
    locks = hold_and_queue_two(holder, first, second)

    assert locks[0].release(holder)

    assert notified(first, NOTIFY_SECONDS)
    assert not notified(second, NOTIFY_SECONDS / 4)
    assert locks[1].try_acquire(first)
    # The new holder left the queue in the statement that took the lock.
    assert set(tickets(observer, locks[0])) == {backend_pid(second)}

    assert locks[1].release(first)
    assert notified(second, NOTIFY_SECONDS)
    assert locks[2].try_acquire(second)
    assert tickets(observer, locks[0]) == {}
    assert locks[2].release(second)


def test_waiter_leaving_passes_wake_on(connections: list[Connection]) -> None:
    holder, first, second, observer = connections
    locks = hold_and_queue_two(holder, first, second)
    assert locks[0].release(holder)
    assert notified(first, NOTIFY_SECONDS)

    # The woken waiter gives up, as after a lock timeout, without trying again.
    locks[1].stop_waiting(first)

    assert notified(second, NOTIFY_SECONDS)
    assert set(tickets(observer, locks[0])) == {backend_pid(second)}
    assert locks[2].try_acquire(second)
    assert locks[2].release(second)


def test_acquiring_waiter_stops_listening(connections: list[Connection]) -> None:
    holder, waiter, _, observer = connections
    locks = [PostgresAdvisoryLock(holder, KEY_TEXT, None) for _ in range(2)]
    assert locks[0].try_acquire(holder)
    join_queue(locks[1], waiter)
    assert locks[0].release(holder)
    assert notified(waiter, NOTIFY_SECONDS)
    assert locks[1].try_acquire(waiter)

    locks[1].stop_waiting(waiter)

    with waiter.begin():
        channels = waiter.execute(sa.text("SELECT pg_listening_channels()")).scalars().all()
    assert channels == []
    assert tickets(observer, locks[0]) == {}
    assert locks[1].release(waiter)


WAITING_PROCESSES = 5
SLOW_REVISION = "f00dfeed0001"


def test_processes_woken_one_per_release(pg_url: str, tmp_path: Path) -> None:
    project = make_project(tmp_path, pg_url)
    # The holder migrates for 4 s, long enough for every other process to
    # start and queue. Each later process then takes the lock in turn, finds
    # the database at head and releases it at once.
    project.add_revision(SLOW_REVISION, EXAMPLE_HEAD, "import time; time.sleep(4)")
    ini = project.ini.read_text()
    project.ini.write_text(
        ini.replace("[logger_alembic]\nlevel = INFO", "[logger_alembic]\nlevel = DEBUG")
    )

    results = run_together(project, WAITING_PROCESSES + 1)

    for returncode, output in results:
        assert returncode == 0, output
    assert read_state(pg_url).versions == [SLOW_REVISION]
    wakes = [output.count("Woken by a release of") for _, output in results]
    # Waking every waiter at each release would give 5 + 4 + 3 + 2 + 1 = 15.
    # One per release gives 5, plus one for each woken waiter that lost the
    # lock to another waiter's poll.
    assert sum(wakes) >= 1, [output for _, output in results]
    assert sum(wakes) < 2 * WAITING_PROCESSES, wakes
