"""Detection of a connection pooler in transaction mode between the migration and PostgreSQL.

A pooler in transaction mode (PgBouncer ``pool_mode = transaction`` and
similar) returns the server connection to its pool after every transaction,
so a session-level advisory lock stays on a server connection that other
clients then use.

Detection runs in two steps. First the client's own socket address is
compared with the client address that PostgreSQL reports for the session:
they match on a direct TCP connection, so nothing more is done. Otherwise
something sits in between, a pooler or a proxy, and a probe checks whether
session state survives from one transaction to the next and stays private
to this client. The probe opens one short second connection.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from . import _compat
from ._errors import PoolerTransactionModeError
from ._log import logger

PROBE_PARAMETER = "alembic_sgp_lock.pooler_probe"


def _local_address(connection: Connection) -> tuple[str, int] | None:
    duplicate = _compat.driver_socket(connection)
    if duplicate is None:
        return None
    with duplicate:
        try:
            address = duplicate.getsockname()
        except OSError:
            return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


def _server_view(connection: Connection) -> tuple[str | None, int | None]:
    with connection.begin():
        row = connection.execute(
            text(
                "SELECT host(client_addr), client_port FROM pg_catalog.pg_stat_activity "
                "WHERE pid = pg_backend_pid()"
            )
        ).first()
    if row is None:
        return None, None
    return row[0], row[1]


def _session_probe(connection: Connection, token: str) -> tuple[int, str]:
    with connection.begin():
        row = connection.execute(
            text("SELECT pg_backend_pid(), current_setting(:name, true)"),
            {"name": PROBE_PARAMETER},
        ).one()
    return int(row[0]), str(row[1] or "")


def is_direct(connection: Connection) -> bool:
    """Tell whether PostgreSQL reports this connection's own socket address as its client."""
    local = _local_address(connection)
    if local is None:
        # NOTE: a Unix-domain socket is taken as direct; a pooler listening on
        # a Unix socket is not detected.
        return True
    server_host, server_port = _server_view(connection)
    return server_port == local[1] and server_host in (local[0], None)


def transaction_pooling_evidence(connection: Connection, engine: Engine) -> str | None:
    """Return why the connection looks transaction-pooled, or None when its session is private.

    Sets a session parameter to a random token, then checks that a second
    transaction on this connection still reads it on the same backend, and that
    a second connection reads neither the token nor the same backend.
    """
    token = uuid.uuid4().hex
    with connection.begin():
        first_pid = int(
            connection.execute(
                text("SELECT pg_backend_pid() FROM set_config(:name, :token, false)"),
                {"name": PROBE_PARAMETER, "token": token},
            ).scalar_one()
        )
    with engine.connect() as other:
        other_pid, other_token = _session_probe(other, token)
    again_pid, again_token = _session_probe(connection, token)
    with connection.begin():
        connection.execute(text("SELECT set_config(:name, '', false)"), {"name": PROBE_PARAMETER})
    if other_token == token or other_pid == first_pid:
        return f"another client connection ran on the same server session, backend pid {first_pid}"
    if again_pid != first_pid or again_token != token:
        return (
            f"two transactions of one client connection ran on backends {first_pid} and "
            f"{again_pid}"
        )
    return None


def check_not_transaction_pooled(connection: Connection, engine: Engine) -> None:
    """Raise :class:`PoolerTransactionModeError` when a transaction-mode pooler sits in between."""
    if connection.dialect.name != "postgresql" or is_direct(connection):
        return
    evidence = transaction_pooling_evidence(connection, engine)
    if evidence is not None:
        raise PoolerTransactionModeError(engine.url.render_as_string(hide_password=True), evidence)
    logger.info(
        "The migration connection goes through a proxy or a pooler in session mode; "
        "its session is private, so the session-level lock is safe"
    )
