"""The few Alembic and SQLAlchemy internals the plugin relies on, kept in one place.

Each helper degrades to a safe result when the internal it reads is missing,
so a new Alembic or SQLAlchemy release makes the plugin more cautious, never
silently unsafe.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from alembic import context as alembic_context
from alembic.runtime.environment import EnvironmentContext
from sqlalchemy.engine import URL, Connection

# Names of the step functions that alembic.command passes to EnvironmentContext
# as ``fn`` (alembic 1.16 to 1.20). upgrade, downgrade and stamp also pass
# ``destination_rev``; ensure_version creates the version table.
_WRITING_FUNCTIONS = frozenset({"upgrade", "downgrade", "do_stamp", "do_ensure_version"})


def current_environment() -> EnvironmentContext | None:
    """Return the EnvironmentContext of the running ``env.py``, or None outside one."""
    proxy = getattr(alembic_context, "_proxy", None)
    return proxy if isinstance(proxy, EnvironmentContext) else None


def _step_function(environment: EnvironmentContext) -> Callable[..., Any] | None:
    options = getattr(environment, "context_opts", None)
    if not isinstance(options, dict):
        return None
    function = options.get("fn")
    return function if callable(function) else None


def command_writes_version_table(environment: EnvironmentContext | None) -> bool:
    """Tell whether the running Alembic command may write the version table.

    ``current``, ``heads``, ``check`` and ``revision --autogenerate`` return
    False. When the command cannot be determined (a programmatic EnvironmentContext,
    a future Alembic), this returns True, so the caller locks.
    """
    if environment is None:
        return True
    options = getattr(environment, "context_opts", None)
    if not isinstance(options, dict):
        return True
    if options.get("dont_mutate"):
        return False
    if "destination_rev" in options:
        return True
    function = _step_function(environment)
    if function is None:
        return True
    return getattr(function, "__name__", "") in _WRITING_FUNCTIONS


def pending_steps(environment: EnvironmentContext | None, heads: Sequence[str]) -> int | None:
    """Count the upgrade or downgrade steps from ``heads`` to the command's target.

    Returns None when that cannot be computed without side effects (stamp, an
    unknown command, a revision these scripts do not contain), so that the
    caller takes the lock and lets Alembic decide.
    """
    if environment is None:
        return None
    function = _step_function(environment)
    name = getattr(function, "__name__", "")
    if function is None or name not in ("upgrade", "downgrade"):
        return None
    try:
        # alembic.command's upgrade() and downgrade() step functions ignore
        # their context argument and return the list of steps to run.
        steps = function(tuple(heads), None)
    except Exception:
        return None
    try:
        return len(steps)
    except TypeError:
        return None


def dbapi_connection(connection: Connection) -> Any:
    """Return the driver's own connection object under a SQLAlchemy Connection."""
    fairy = connection.connection
    # SQLAlchemy 2.0 names it dbapi_connection; 1.4 names it connection.
    driver_connection = getattr(fairy, "dbapi_connection", None)
    if driver_connection is None:
        driver_connection = getattr(fairy, "connection", None)
    return driver_connection


def command_name(environment: EnvironmentContext | None) -> str | None:
    """Return the name of the Alembic step function that runs (``upgrade``, ``do_stamp``...).

    Returns None outside an Alembic command or when the name cannot be read.
    """
    if environment is None:
        return None
    function = _step_function(environment)
    name = getattr(function, "__name__", None)
    return name if isinstance(name, str) else None


def destination_revision(environment: EnvironmentContext | None) -> str | None:
    """Return the target revision of an upgrade, downgrade or stamp as given to the command."""
    if environment is None:
        return None
    options = getattr(environment, "context_opts", None)
    if not isinstance(options, dict):
        return None
    destination = options.get("destination_rev")
    return destination if isinstance(destination, str) else None


def step_script_path(step: Any) -> str | None:
    """Return the file of the revision that an Alembic migration step runs, if known."""
    script = getattr(step, "revision", None)
    path = getattr(script, "path", None)
    return path if isinstance(path, str) else None


def replace_steps_function(
    migration_context: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> bool:
    """Replace the step function of a configured MigrationContext with ``wrap(function)``.

    Alembic has no hook that runs before each revision, so the half-applied
    marker wraps ``MigrationContext._migrations_fn`` (alembic 1.16 to 1.20),
    which ``run_migrations()`` iterates. Returns False, changing nothing, when
    that attribute is missing.
    """
    function = getattr(migration_context, "_migrations_fn", None)
    if not callable(function):
        return False
    migration_context._migrations_fn = wrap(function)
    return True


def driver_socket(connection: Connection) -> socket.socket | None:
    """Return a duplicate of the driver's network socket, or None when it has none.

    The caller closes the duplicate; options set on it apply to the driver's
    socket, because both descriptors share one kernel socket.
    """
    driver_connection = dbapi_connection(connection)
    # SQLAlchemy's asyncio adapters keep the driver's own connection here.
    driver_connection = getattr(driver_connection, "driver_connection", driver_connection)
    descriptor: int | None = None
    fileno = getattr(driver_connection, "fileno", None)
    if callable(fileno):
        try:
            descriptor = int(fileno())
        except Exception:
            descriptor = None
    else:
        # asyncpg exposes its socket only through the private asyncio transport.
        transport = getattr(driver_connection, "_transport", None)
        raw_socket = transport.get_extra_info("socket") if transport is not None else None
        descriptor = raw_socket.fileno() if raw_socket is not None else None
    if descriptor is None or descriptor < 0:
        return None
    return socket.socket(fileno=os.dup(descriptor))


def greenlet_spawn(function: Callable[..., Any], *arguments: Any) -> Awaitable[Any]:
    """Run a synchronous function that uses an asyncio engine's sync API, from a coroutine."""
    # SQLAlchemy runs sync code over async drivers in a greenlet; run_sync() on
    # a connection does the same, but would need a second connection here.
    from sqlalchemy.util import greenlet_spawn as spawn

    return spawn(function, *arguments)


def forbid_autocommit_block(migration_context: Any, message: str) -> None:
    """Make ``autocommit_block()`` on this MigrationContext raise ``LockModeError(message)``."""
    from ._errors import LockModeError

    def autocommit_block() -> Any:
        raise LockModeError(message)

    # Revisions reach it as op.get_context().autocommit_block(); an instance
    # attribute shadows the method for this context only.
    migration_context.autocommit_block = autocommit_block


def with_installed_driver(url: URL) -> URL:
    """Return ``url`` with psycopg2 as its driver when it names none and psycopg 3 is missing."""
    # SQLAlchemy 2.1 maps a bare postgresql:// URL to psycopg 3, while this
    # package depends on psycopg2.
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return url.set(drivername="postgresql+psycopg2")
    return url
