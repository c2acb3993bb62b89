"""PostgreSQL lock backend: a session-level advisory lock on the migration connection.

Waiters poll ``pg_try_advisory_lock`` in short transactions, so no waiter holds
a snapshot that a holder's ``CREATE INDEX CONCURRENTLY`` would wait for.

With psycopg2 the waiters also form a queue, so that a release wakes one waiter
instead of all of them. Each waiter LISTENs on a channel named after its
backend pid and holds a shared advisory lock whose second key is a ticket: the
server clock in milliseconds when it joined. The releasing session NOTIFYs the
channel of the waiter with the oldest ticket, found in ``pg_locks``. Woken all
at once, the waiters would compete for the CPU and delay the one that wins the
lock (see the hand-off section of benchmarks/README.md).

Every waiter also polls at a random interval of up to 0.5 s. That covers a
holder that dies without a release, a woken waiter that loses the race to
another session, and sessions of older plugin versions, which listen on one
shared channel.
"""

from __future__ import annotations

import random
import re
import select
import time
from collections.abc import Hashable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from . import _compat
from ._backend import stable_hash64
from ._errors import LockHolder
from ._log import logger

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# PostgreSQL truncates application_name to 63 bytes (NAMEDATALEN - 1) and
# keeps it ASCII, so a tagged name keeps at most this many characters of the
# original: 63 minus the tag, " [alembic-sgp-lock since <epoch to 0.1 s>]".
# Tags of older releases carry whole seconds, which HOLDER_TAG also reads.
APPLICATION_NAME_MAX_BYTES = 63
TAGGED_PREFIX_MAX = APPLICATION_NAME_MAX_BYTES - len(" [alembic-sgp-lock since 1234567890.1]")
HOLDER_TAG = re.compile(r"\s*\[alembic-sgp-lock since (\d+(?:\.\d+)?)\]$")

# Without a notification a waiter polls at a random interval in this range
# (seconds). With LISTEN it waits up to the upper bound for a notification and
# then polls anyway, in case the holder died without notifying.
POLL_INTERVAL = (0.01, 0.05)
NOTIFY_WAIT_MAX = 0.5

# A waiter's queue ticket: the server clock in milliseconds, modulo the int4
# range that the two-key advisory lock functions take. The order is first come,
# first served, except across the wrap-around every 24.8 days.
TICKET_SQL = "(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint % 2147483647)::int"

# A scalar subquery that NOTIFYs the waiter with the oldest ticket in this
# database, if there is one. Parameters: the channel prefix and the queue key.
WAKE_NEXT_WAITER = (
    "SELECT pg_notify(:prefix || l.pid::text, '') FROM pg_catalog.pg_locks l "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
    "AND l.classid = CAST(:queue AS oid) AND l.pid <> pg_backend_pid() "
    "AND l.database = (SELECT oid FROM pg_catalog.pg_database "
    "WHERE datname = current_database()) "
    "ORDER BY l.objid, l.pid LIMIT 1"
)


def lock_key(key_text: str, explicit_name: str | None) -> int:
    """Return the advisory lock key: an explicit 64-bit integer name as is, else a stable hash."""
    if explicit_name is not None:
        try:
            value = int(explicit_name)
        except ValueError:
            pass
        else:
            if INT64_MIN <= value <= INT64_MAX:
                return value
    return stable_hash64(key_text)


@dataclass(frozen=True)
class QueuedWaiter:
    """A session in the queue for the lock."""

    pid: int
    application_name: str | None
    waiting_seconds: float


class PostgresAdvisoryLock:
    """Session-level ``pg_advisory_lock`` keyed by a signed 64-bit integer."""

    def __init__(self, connection: Connection, key_text: str, explicit_name: str | None) -> None:
        self.key = lock_key(key_text, explicit_name)
        unsigned = self.key & 0xFFFFFFFFFFFFFFFF
        # pg_locks shows a bigint advisory key as two oids and objsubid 1.
        self.classid = unsigned >> 32
        self.objid = unsigned & 0xFFFFFFFF
        # A waiter's channel is this prefix plus its backend pid.
        self.channel_prefix = f"alembic_sgp_lock_{unsigned:016x}_"
        # First key of the waiters' tickets, an int4 as the two-key functions take.
        self.queue_key = stable_hash64(f"alembic-sgp-lock queue {self.key}") & 0x7FFFFFFF
        self.name = f"postgresql advisory lock {self.key} ({key_text})"
        url = connection.engine.url
        self.identity: Hashable = ("postgresql", url.host, url.port, url.database, self.key)
        self._original_application_name: str | None = None
        self._channel: str | None = None
        self._ticket: int | None = None

    def try_acquire(self, connection: Connection) -> bool:
        # One statement, so a waiter takes over in a single round trip plus
        # COMMIT. When it gets the lock, it also leaves the queue and tags
        # application_name, so that pg_stat_activity shows who migrates and
        # since when. release() restores the original value.
        # The FROM subquery runs once, because PostgreSQL does not flatten a
        # subquery with volatile functions. With a NULL ticket the strict
        # unlock function does nothing.
        with connection.begin():
            acquired, original = connection.execute(
                text(
                    "SELECT attempt.acquired, attempt.original, "
                    "CASE WHEN attempt.acquired THEN set_config('application_name', "
                    "ltrim(left(attempt.original, :room) || ' [alembic-sgp-lock since ' "
                    "|| attempt.since || ']'), false) END, "
                    "CASE WHEN attempt.acquired THEN pg_advisory_unlock_shared("
                    "CAST(:queue AS integer), CAST(:ticket AS integer)) END "
                    "FROM (SELECT pg_try_advisory_lock(:key) AS acquired, "
                    "current_setting('application_name') AS original, "
                    "round(extract(epoch FROM clock_timestamp())::numeric, 1) AS since) "
                    "AS attempt"
                ),
                {
                    "key": self.key,
                    "room": TAGGED_PREFIX_MAX,
                    "queue": self.queue_key,
                    "ticket": self._ticket,
                },
            ).one()[:2]
        if acquired:
            self._original_application_name = original
            self._ticket = None
        return bool(acquired)

    def wait(self, connection: Connection, seconds: float) -> None:
        driver_connection = _compat.dbapi_connection(connection)
        if not hasattr(driver_connection, "notifies") or not hasattr(driver_connection, "poll"):
            time.sleep(min(seconds, random.uniform(*POLL_INTERVAL)))
            return
        if self._channel is None:
            self._join_queue(connection)
            # A release between the caller's failed try and joining the queue
            # woke no one, so return for one more try.
            return
        if not driver_connection.notifies:
            timeout = min(seconds, random.uniform(NOTIFY_WAIT_MAX / 2, NOTIFY_WAIT_MAX))
            readable, _, _ = select.select([driver_connection], [], [], timeout)
            if readable:
                driver_connection.poll()
        if driver_connection.notifies:
            logger.debug("Woken by a release of %s", self.name)
            driver_connection.notifies.clear()

    def _join_queue(self, connection: Connection) -> None:
        # LISTEN takes effect at COMMIT, and a releaser may pick this session
        # as soon as its ticket shows in pg_locks, so the ticket comes second.
        with connection.begin():
            pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            channel = f"{self.channel_prefix}{pid}"
            connection.execute(text(f'LISTEN "{channel}"'))
        self._channel = channel
        with connection.begin():
            ticket, queued = connection.execute(
                text(
                    "SELECT ticket.value, "
                    "pg_try_advisory_lock_shared(CAST(:queue AS integer), ticket.value) "
                    f"FROM (SELECT {TICKET_SQL} AS value) AS ticket"
                ),
                {"queue": self.queue_key},
            ).one()
        # Only a foreign session holding this very key exclusively can make
        # the shared lock fail. This session then waits by polling alone.
        self._ticket = int(ticket) if queued else None

    def stop_waiting(self, connection: Connection) -> None:
        if self._channel is None:
            return
        channel, self._channel = self._channel, None
        ticket, self._ticket = self._ticket, None
        with connection.begin():
            connection.execute(text(f'UNLISTEN "{channel}"'))
            if ticket is not None:
                # Leaving without the lock: a release may have woken this
                # session, so pass the wake-up on to the next waiter.
                connection.execute(
                    text(
                        "SELECT pg_advisory_unlock_shared(CAST(:queue AS integer), "
                        f"CAST(:ticket AS integer)), ({WAKE_NEXT_WAITER})"
                    ),
                    {"queue": self.queue_key, "ticket": ticket, "prefix": self.channel_prefix},
                )
        driver_connection = _compat.dbapi_connection(connection)
        notifies = getattr(driver_connection, "notifies", None)
        if notifies is not None:
            notifies.clear()

    def release(self, connection: Connection) -> bool:
        original = self._original_application_name
        self._original_application_name = None
        # One statement: unlock, restore application_name, and wake the oldest
        # waiter (PostgreSQL delivers the notification at COMMIT).
        with connection.begin():
            released = connection.execute(
                text(
                    "SELECT pg_advisory_unlock(:key), "
                    "set_config('application_name', coalesce(:name, "
                    "current_setting('application_name')), false), "
                    f"({WAKE_NEXT_WAITER})"
                ),
                {
                    "key": self.key,
                    "name": original,
                    "queue": self.queue_key,
                    "prefix": self.channel_prefix,
                },
            ).one()[0]
        return bool(released)

    def queued_waiters(self, connection: Connection) -> list[QueuedWaiter]:
        """Return the sessions queued for the lock, longest waiting first.

        Only psycopg2 sessions queue. Other drivers wait by polling and are not listed.
        """
        with connection.begin():
            rows = connection.execute(
                text(
                    "SELECT l.pid, a.application_name, "
                    f"({TICKET_SQL} - l.objid::bigint + 2147483647) % 2147483647 "
                    "FROM pg_catalog.pg_locks l "
                    "LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
                    "AND l.classid = CAST(:queue AS oid) "
                    "AND l.database = (SELECT oid FROM pg_catalog.pg_database "
                    "WHERE datname = current_database()) "
                    "ORDER BY 3 DESC, l.pid"
                ),
                {"queue": self.queue_key},
            ).all()
        return [
            QueuedWaiter(int(pid), application_name or None, int(age_ms) / 1000)
            for pid, application_name, age_ms in rows
        ]

    def holder(self, connection: Connection) -> LockHolder | None:
        with connection.begin():
            row = connection.execute(
                text(
                    "SELECT a.pid, a.application_name, host(a.client_addr), a.client_port, "
                    "extract(epoch FROM clock_timestamp())::float8, a.state, "
                    "left(a.query, 120) "
                    "FROM pg_catalog.pg_locks l "
                    "JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                    "AND l.classid = CAST(:classid AS oid) AND l.objid = CAST(:objid AS oid) "
                    "AND l.database = (SELECT oid FROM pg_catalog.pg_database "
                    "WHERE datname = current_database())"
                ),
                {"classid": self.classid, "objid": self.objid},
            ).first()
        if row is None:
            return None
        pid, application_name, client_host, client_port, now_epoch, state, query = row
        held_seconds = None
        if application_name:
            match = HOLDER_TAG.search(application_name)
            if match:
                held_seconds = max(0.0, float(now_epoch) - float(match.group(1)))
                application_name = application_name[: match.start()]
        client = None
        if client_host is not None:
            client = f"{client_host}:{client_port}" if client_port is not None else client_host
        elif client_port == -1 or client_port is None:
            client = "local socket" if state is not None else None
        description = None
        if state:
            description = f"state {state}"
            if query:
                # One line, as the DDL blockers are logged, so a multi-line
                # statement does not show as escaped line breaks.
                description += f", last statement {' '.join(query.split())!r}"
        return LockHolder(
            pid=int(pid),
            application_name=application_name or None,
            client_address=client,
            held_seconds=held_seconds,
            description=description,
            statement=query.strip() if query else None,
        )
