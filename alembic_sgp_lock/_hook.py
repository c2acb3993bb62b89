"""``run_migrations()``: the whole body of a locked ``env.py``."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationInfo
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import URL, Connection, Engine, make_url

from . import _compat
from ._errors import MigrationLockError
from ._lock import commit_open_transaction, hold_lock
from ._log import logger
from ._retry import Attempt, run_with_retries
from ._settings import Settings
from ._state import format_heads, read_heads


def run_migrations(
    *,
    target_metadata: Any = None,
    url: str | None = None,
    engine: Engine | None = None,
    settings: Settings | None = None,
    **configure_options: Any,
) -> None:
    """Run the current Alembic command under the migration lock; call it from ``env.py``.

    Online, it connects with ``NullPool``, skips the lock when the database is
    already at the target, otherwise takes the lock, re-reads the version table
    and migrates, retrying transient errors. Offline (``--sql``) it only
    renders SQL. Commands that do not write the version table run unlocked.

    :param target_metadata: passed to ``context.configure``.
    :param url: database URL; defaults to ``sqlalchemy.url`` and the other
        ``sqlalchemy.*`` options of the ini section.
    :param engine: an engine to use instead of building one from ``url``.
    :param settings: defaults to :meth:`Settings.from_env`, read before any connection.
    :param configure_options: further ``context.configure`` options, such as
        ``version_table``, ``compare_type`` or ``transaction_per_migration``.
    :raises InvalidSettingError: a ``MIGRATION_*`` variable is invalid.
    :raises LockTimeoutError: the lock was not acquired (with one attempt).
    :raises RetriesExhaustedError: every attempt failed with a transient error.
    """
    settings = settings if settings is not None else Settings.from_env()
    if not settings.run_migrations:
        logger.info("RUN_MIGRATIONS is false: skipping migrations without connecting")
        return
    if context.is_offline_mode():
        _run_offline(target_metadata, url, engine, configure_options)
        return

    own_engine = engine is None
    migration_engine = engine if engine is not None else _build_engine(url)
    try:
        _run_online(migration_engine, target_metadata, settings, configure_options)
    finally:
        if own_engine:
            migration_engine.dispose()


def _build_engine(url: str | None) -> Engine:
    config = context.config
    # Values are strings from the ini file, except the URL object set below.
    options: dict[str, Any] = dict(config.get_section(config.config_ini_section, {}))
    if url is not None:
        options["sqlalchemy.url"] = url
    if not options.get("sqlalchemy.url"):
        raise MigrationLockError(
            f"No database URL: set sqlalchemy.url in the [{config.config_ini_section}] section "
            f"of {config.config_file_name or 'alembic.ini'}, or pass url= to "
            "alembic_sgp_lock.run_migrations()"
        )
    options["sqlalchemy.url"] = _with_installed_driver(make_url(options["sqlalchemy.url"]))
    return engine_from_config(options, prefix="sqlalchemy.", poolclass=pool.NullPool)


def _with_installed_driver(url: URL) -> URL:
    # SQLAlchemy 2.1 maps a bare postgresql:// URL to psycopg 3, while this
    # package depends on psycopg2; use psycopg2 when psycopg 3 is missing.
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return url.set(drivername="postgresql+psycopg2")
    return url


def _run_offline(
    target_metadata: Any, url: str | None, engine: Engine | None, configure_options: dict[str, Any]
) -> None:
    logger.info("Offline (--sql) mode: rendering SQL without a connection, lock or checks")
    if url is None and engine is not None:
        url = engine.url.render_as_string(hide_password=False)
    if url is None:
        url = context.config.get_main_option("sqlalchemy.url")
    options: dict[str, Any] = {"literal_binds": True, "dialect_opts": {"paramstyle": "named"}}
    options.update(configure_options)
    context.configure(url=url, target_metadata=target_metadata, **options)
    with context.begin_transaction():
        context.run_migrations()


def _run_online(
    engine: Engine, target_metadata: Any, settings: Settings, configure_options: dict[str, Any]
) -> None:
    environment = _compat.current_environment()
    safe_url = engine.url.render_as_string(hide_password=True)
    if not _compat.command_writes_version_table(environment):
        # current, heads, check and the like: never wait behind a migration.
        with engine.connect() as connection:
            _configure_and_run(connection, target_metadata, configure_options, None)
        return

    version_table = configure_options.get("version_table", "alembic_version")
    version_table_schema = configure_options.get("version_table_schema")

    def attempt_migration(attempt: Attempt) -> None:
        started = time.monotonic()
        logger.info("Connecting to %s (attempt %d)", safe_url, attempt.number)
        with engine.connect() as connection:
            try:
                heads = read_heads(connection, version_table, version_table_schema)
                if settings.lock_enabled and _compat.pending_steps(environment, heads) == 0:
                    logger.info(
                        "Database is already at %s; nothing to migrate, lock not taken",
                        format_heads(heads),
                    )
                    return
                with (
                    hold_lock(
                        connection,
                        settings=settings,
                        version_table=version_table,
                        version_table_schema=version_table_schema,
                        timeout=min(settings.lock_timeout, attempt.remaining()),
                    )
                    if settings.lock_enabled
                    else _unlocked()
                ):
                    _migrate_under_lock(
                        connection,
                        target_metadata,
                        configure_options,
                        attempt,
                        version_table,
                        version_table_schema,
                    )
            except BaseException:
                # Never hand a connection in an unknown state back to a pool.
                connection.invalidate()
                raise
        logger.info("Migration run finished in %.2f s", time.monotonic() - started)

    if not settings.lock_enabled:
        logger.warning("MIGRATION_LOCK is false: running migrations without a lock")
    run_with_retries(attempt_migration, settings)


class _unlocked:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def _migrate_under_lock(
    connection: Connection,
    target_metadata: Any,
    configure_options: dict[str, Any],
    attempt: Attempt,
    version_table: str,
    version_table_schema: str | None,
) -> None:
    # Another instance may have migrated while this one waited.
    heads_before = read_heads(connection, version_table, version_table_schema)
    logger.info("Revision before migrating: %s", format_heads(heads_before))
    started = time.monotonic()
    _configure_and_run(connection, target_metadata, configure_options, attempt)
    commit_open_transaction(connection)
    heads_after = read_heads(connection, version_table, version_table_schema)
    logger.info(
        "Revision after migrating: %s (%.2f s)",
        format_heads(heads_after),
        time.monotonic() - started,
    )


def _configure_and_run(
    connection: Connection,
    target_metadata: Any,
    configure_options: dict[str, Any],
    attempt: Attempt | None,
) -> None:
    options = dict(configure_options)
    options["on_version_apply"] = _step_logger(options.get("on_version_apply"))
    context.configure(connection=connection, target_metadata=target_metadata, **options)
    if attempt is not None:
        attempt.transactional_ddl = bool(context.get_context().impl.transactional_ddl)
        attempt.migrations_started = True
    with context.begin_transaction():
        context.run_migrations()


def _step_logger(user_callback: Callable[..., None] | None) -> Callable[..., None]:
    last_step_end = [time.monotonic()]

    def on_version_apply(
        *, ctx: Any, step: MigrationInfo, heads: set[str], run_args: dict[str, Any]
    ) -> None:
        now = time.monotonic()
        source = ", ".join(step.source_revision_ids) or "base"
        destination = ", ".join(step.destination_revision_ids) or "base"
        kind = "stamp" if step.is_stamp else "upgrade" if step.is_upgrade else "downgrade"
        duration = now - last_step_end[0]
        logger.info("Applied %s %s -> %s in %.2f s", kind, source, destination, duration)
        last_step_end[0] = now
        if user_callback is not None:
            user_callback(ctx=ctx, step=step, heads=heads, run_args=run_args)

    return on_version_apply
