"""Session settings of the migration connection: dead-peer detection and DDL timeouts.

Every server setting is sent with ``set_config()`` after connecting, never
as the ``options`` startup parameter, which PgBouncer rejects.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection

from . import _compat
from ._errors import DdlLockTimeoutError
from ._log import logger
from ._settings import Settings

# TCP keepalives on both ends of the migration connection: the first probe
# after KEEPALIVE_IDLE s of silence, then one every KEEPALIVE_INTERVAL s, and
# the peer is declared dead after KEEPALIVE_COUNT unanswered probes (25 s).
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# Data left unacknowledged this long also closes the connection (Linux TCP_USER_TIMEOUT).
TCP_USER_TIMEOUT_MS = 30_000
# PostgreSQL 14+ checks this often whether the client of a running statement is gone.
CLIENT_CHECK_INTERVAL_MS = 5_000

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"


def set_client_keepalives(connection: Connection) -> bool:
    """Turn on TCP keepalives on the driver's socket; return False when it has no TCP socket."""
    duplicate = _compat.driver_socket(connection)
    if duplicate is None:
        return False
    with duplicate:
        if duplicate.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        duplicate.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS),
        ):
            option = getattr(socket, name, None)
            # Missing outside Linux; the system's keepalive defaults apply then.
            if option is not None:
                with contextlib.suppress(OSError):
                    duplicate.setsockopt(socket.IPPROTO_TCP, option, value)
    return True


def dead_client_parameters(connection: Connection) -> dict[str, str]:
    """Return the server settings that end the session of a client that died or is unreachable."""
    parameters = {
        "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
        "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
        "tcp_keepalives_count": str(KEEPALIVE_COUNT),
        "tcp_user_timeout": str(TCP_USER_TIMEOUT_MS),
    }
    server_version = connection.dialect.server_version_info or (0,)
    if server_version >= (14,):
        parameters["client_connection_check_interval"] = str(CLIENT_CHECK_INTERVAL_MS)
    return parameters


def timeout_parameters(settings: Settings) -> dict[str, str]:
    """Return the ``lock_timeout`` and ``statement_timeout`` that are set, in milliseconds."""
    parameters = {}
    if settings.ddl_lock_timeout is not None:
        parameters["lock_timeout"] = str(max(1, round(settings.ddl_lock_timeout * 1000)))
    if settings.statement_timeout is not None:
        parameters["statement_timeout"] = str(max(1, round(settings.statement_timeout * 1000)))
    return parameters


def set_parameters(connection: Connection, parameters: dict[str, str], *, local: bool) -> None:
    """Set server parameters in the connection's current transaction, in one round trip."""
    if not parameters:
        return
    calls = []
    values: dict[str, object] = {"local": local}
    for index, (name, value) in enumerate(parameters.items()):
        calls.append(f"set_config(:name_{index}, :value_{index}, :local)")
        values[f"name_{index}"] = name
        values[f"value_{index}"] = value
    connection.execute(text("SELECT " + ", ".join(calls)), values)


def prepare_connection(connection: Connection) -> None:
    """Bound how long a lost client keeps the migration lock; call it right after connecting."""
    set_client_keepalives(connection)
    if connection.dialect.name != "postgresql":
        return
    with connection.begin():
        set_parameters(connection, dead_client_parameters(connection), local=False)


@contextmanager
def ddl_timeouts(connection: Connection, settings: Settings) -> Iterator[None]:
    """Apply the DDL lock and statement timeouts to the session while the body migrates.

    Session-level values reach every revision's transaction and every
    ``autocommit_block()``; the previous values come back afterwards. A
    statement cancelled by ``lock_timeout`` raises :class:`DdlLockTimeoutError`
    naming the sessions that hold table locks.
    """
    parameters = timeout_parameters(settings)
    if not parameters or connection.dialect.name != "postgresql":
        yield
        return
    with connection.begin():
        previous = {
            name: str(connection.execute(text(f"SHOW {name}")).scalar()) for name in parameters
        }
        set_parameters(connection, parameters, local=False)
    logger.info(
        "Migrating with %s",
        ", ".join(f"{name} = {value} ms" for name, value in parameters.items()),
    )
    try:
        yield
    except sa_exc.DBAPIError as error:
        raise translate_timeout(connection, settings, error) from error
    with connection.begin():
        set_parameters(connection, previous, local=False)


def sqlstate(error: sa_exc.DBAPIError) -> str | None:
    """Return the SQLSTATE of a PostgreSQL driver error, or None."""
    original = error.orig
    code = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    return code if isinstance(code, str) else None


def translate_timeout(
    connection: Connection, settings: Settings, error: sa_exc.DBAPIError
) -> BaseException:
    """Return the error to raise for a failed migration statement.

    A ``lock_timeout`` cancel becomes :class:`DdlLockTimeoutError`; anything
    else is returned unchanged.
    """
    code = sqlstate(error)
    if code == QUERY_CANCELED and settings.statement_timeout is not None:
        logger.error(
            "A migration statement ran longer than MIGRATION_STATEMENT_TIMEOUT=%g s and was "
            "cancelled; statement timeouts are not retried",
            settings.statement_timeout,
        )
    if code != LOCK_NOT_AVAILABLE or settings.ddl_lock_timeout is None:
        return error
    statement = " ".join(str(error.statement or "").split())[:160] or None
    blockers = lock_holders(connection, statement)
    for blocker in blockers:
        logger.warning("Table lock held by %s", blocker)
    return DdlLockTimeoutError(settings.ddl_lock_timeout, statement, blockers)


def lock_holders(connection: Connection, statement: str | None) -> list[str]:
    """Describe the other sessions that hold table locks in this database, oldest first.

    When some of those tables appear in ``statement``, only their holders are
    listed. Returns an empty list when the server cannot be asked.
    """
    try:
        # Connection.rollback() is missing in SQLAlchemy 1.4's legacy mode.
        transaction = connection.get_transaction()
        if transaction is not None:
            transaction.rollback()
        with connection.begin():
            rows = connection.execute(
                text(
                    "SELECT a.pid, a.application_name, host(a.client_addr), a.state, "
                    "extract(epoch FROM clock_timestamp() - a.xact_start)::float8, "
                    "left(a.query, 120), array_agg(DISTINCT c.relname) "
                    "FROM pg_catalog.pg_locks l "
                    "JOIN pg_catalog.pg_class c ON c.oid = l.relation "
                    "JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'relation' AND l.granted "
                    "AND l.pid <> pg_backend_pid() "
                    "AND l.database = (SELECT oid FROM pg_catalog.pg_database "
                    "WHERE datname = current_database()) "
                    "AND c.relnamespace <> 'pg_catalog'::regnamespace "
                    "AND a.xact_start IS NOT NULL "
                    "GROUP BY a.pid, a.application_name, a.client_addr, a.state, "
                    "a.xact_start, a.query "
                    "ORDER BY a.xact_start LIMIT 10"
                )
            ).all()
    except Exception:
        logger.debug("Could not list the sessions that hold table locks", exc_info=True)
        return []
    words = set(re.findall(r"\w+", (statement or "").lower()))
    matching = [row for row in rows if words & {str(name).lower() for name in row[6]}]
    descriptions = []
    for pid, application, client, state, open_seconds, query, tables in matching or rows:
        parts = [f"pid {pid}"]
        if application:
            parts.append(f"application {application!r}")
        if client:
            parts.append(f"client {client}")
        parts.append(f"state {state}")
        if open_seconds is not None:
            parts.append(f"transaction open {float(open_seconds):.1f} s")
        parts.append(f"tables {', '.join(sorted(str(name) for name in tables))}")
        if query:
            parts.append(f"last statement {' '.join(str(query).split())!r}")
        descriptions.append(", ".join(parts))
    return descriptions
