"""The few Alembic and SQLAlchemy internals the plugin relies on, kept in one place.

Each helper degrades to a safe answer when the internal it reads is missing,
so a new Alembic or SQLAlchemy release makes the plugin more cautious, never
silently unsafe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alembic import context as alembic_context
from alembic.runtime.environment import EnvironmentContext
from sqlalchemy.engine import Connection

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
    False. When the command cannot be told (a programmatic EnvironmentContext,
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
