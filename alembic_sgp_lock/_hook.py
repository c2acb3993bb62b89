"""``run_migrations()``: the whole body of a locked ``env.py``."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection, Engine, make_url

# Only what every online run needs is imported here. The lock, migration,
# ledger and pre-flight modules are imported where they are used, so the
# fast path for a database at head skips them unless MIGRATION_LEDGER or
# MIGRATION_LOCK_MODE=transaction needs them.
from . import _compat
from ._autogenerate import exclude_plugin_tables
from ._errors import MigrationLockError
from ._log import logger
from ._retry import Attempt, run_with_retries
from ._session import ddl_timeouts, prepare_connection, set_client_keepalives
from ._settings import Settings
from ._signals import stop_on_signals
from ._state import format_heads, read_heads

if TYPE_CHECKING:
    # sqlalchemy.ext.asyncio needs greenlet, which only asyncio projects install.
    from sqlalchemy.ext.asyncio import AsyncEngine


def run_migrations(
    *,
    target_metadata: Any = None,
    url: str | None = None,
    engine: Engine | AsyncEngine | None = None,
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
        ``sqlalchemy.*`` options of the ini section. An asyncio driver
        (``postgresql+asyncpg``, ``postgresql+psycopg_async``) is run with
        ``asyncio.run()``. ``MIGRATION_DATABASE_URL`` replaces it when set.
    :param engine: an engine, sync or asyncio, to use instead of building one
        from ``url``; ignored when ``MIGRATION_DATABASE_URL`` is set.
    :param settings: defaults to :meth:`Settings.from_env`, read before any connection.
    :param configure_options: further ``context.configure`` options, such as
        ``version_table``, ``compare_type`` or ``transaction_per_migration``.
    :raises InvalidSettingError: a ``MIGRATION_*`` variable is invalid.
    :raises LockTimeoutError: the lock was not acquired (with one attempt).
    :raises RetriesExhaustedError: every attempt failed with a transient error.
    :raises PoolerTransactionModeError: the connection goes through a
        transaction-mode pooler and ``MIGRATION_LOCK_MODE`` is ``session``.
    :raises MigrationInterruptedError: SIGTERM or SIGINT stopped the run.
    """
    settings = settings if settings is not None else Settings.from_env()
    if settings.database_url is not None:
        url = settings.database_url
        engine = None
    if not settings.run_migrations:
        logger.info("RUN_MIGRATIONS is false: skipping migrations without connecting")
        return
    configure_options["include_object"] = exclude_plugin_tables(
        configure_options.get("include_object"), settings
    )
    if context.is_offline_mode():
        offline_engine = (
            engine if engine is None or isinstance(engine, Engine) else engine.sync_engine
        )
        _run_offline(target_metadata, url, offline_engine, configure_options)
        return

    own_engine = engine is None
    migration_engine = engine if engine is not None else _build_engine(url)
    with stop_on_signals():
        if not isinstance(migration_engine, Engine):
            asyncio.run(
                _run_online_async(
                    migration_engine, own_engine, target_metadata, settings, configure_options
                )
            )
            return
        try:
            _run_online(migration_engine, target_metadata, settings, configure_options)
        finally:
            if own_engine:
                migration_engine.dispose()


async def _run_online_async(
    engine: AsyncEngine,
    own_engine: bool,
    target_metadata: Any,
    settings: Settings,
    configure_options: dict[str, Any],
) -> None:
    try:
        await _compat.greenlet_spawn(
            _run_online, engine.sync_engine, target_metadata, settings, configure_options
        )
    finally:
        if own_engine:
            await engine.dispose()


def _build_engine(url: str | None) -> Engine | AsyncEngine:
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
    options["sqlalchemy.url"] = _compat.with_installed_driver(make_url(options["sqlalchemy.url"]))
    if options["sqlalchemy.url"].get_dialect().is_async:
        from sqlalchemy.ext.asyncio import async_engine_from_config

        return async_engine_from_config(options, prefix="sqlalchemy.", poolclass=pool.NullPool)
    return engine_from_config(options, prefix="sqlalchemy.", poolclass=pool.NullPool)


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
        from ._migrate import configure_and_run

        # current, heads, check and the like: never wait behind a migration.
        with engine.connect() as connection:
            configure_and_run(connection, target_metadata, configure_options, None)
        return

    version_table = configure_options.get("version_table", "alembic_version")
    version_table_schema = configure_options.get("version_table_schema")
    transaction_scoped = settings.lock_enabled and settings.lock_mode == "transaction"
    if transaction_scoped:
        from ._transaction_lock import reject_transaction_per_migration

        reject_transaction_per_migration(configure_options)

    def attempt_migration(attempt: Attempt) -> None:
        started = time.monotonic()
        logger.info("Connecting to %s (attempt %d)", safe_url, attempt.number)
        with engine.connect() as connection:
            try:
                if transaction_scoped:
                    # Session-level settings would outlive the transaction in a pooler.
                    set_client_keepalives(connection)
                else:
                    prepare_connection(connection)
                heads = read_heads(connection, version_table, version_table_schema)
                # Duplicate rows look like "already at head" to Alembic; the
                # pre-flight checks under the lock report them instead.
                no_duplicates = len(set(heads)) == len(heads)
                if (
                    settings.lock_enabled
                    and no_duplicates
                    and _compat.pending_steps(environment, heads) == 0
                    and not _ledger_needs_baseline(connection, settings, version_table_schema)
                ):
                    if settings.ledger:
                        from ._ledger import Ledger
                        from ._migrate import check_checksums

                        # Read-only, so an edited revision is reported without the lock.
                        ledger = Ledger(
                            settings.ledger_table, version_table_schema, context.script
                        )
                        check_checksums(connection, ledger, heads, settings)
                    logger.info(
                        "Database is already at %s; nothing to migrate, lock not taken",
                        format_heads(heads),
                    )
                    return

                from ._lock import hold_lock
                from ._migrate import configure_and_run, migrate_under_lock
                from ._pooler import check_not_transaction_pooled
                from ._transaction_lock import migrate_in_one_transaction

                if transaction_scoped:
                    migrate_in_one_transaction(
                        connection,
                        settings=settings,
                        version_table=version_table,
                        version_table_schema=version_table_schema,
                        timeout=min(settings.lock_timeout, attempt.remaining()),
                        # Alembic reads the heads itself, inside the locked transaction.
                        migrate=lambda locked: configure_and_run(
                            locked, target_metadata, configure_options, attempt
                        ),
                    )
                    return
                if settings.lock_enabled:
                    check_not_transaction_pooled(connection, engine)
                with (
                    hold_lock(
                        connection,
                        settings=settings,
                        version_table=version_table,
                        version_table_schema=version_table_schema,
                        timeout=min(settings.lock_timeout, attempt.remaining()),
                    )
                    if settings.lock_enabled
                    else _unlocked(),
                    ddl_timeouts(connection, settings),
                ):
                    migrate_under_lock(
                        connection,
                        target_metadata,
                        configure_options,
                        attempt,
                        version_table,
                        version_table_schema,
                        settings,
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


def _ledger_needs_baseline(
    connection: Connection, settings: Settings, version_table_schema: str | None
) -> bool:
    if not settings.ledger:
        return False
    with connection.begin():
        return not sa.inspect(connection).has_table(
            settings.ledger_table, schema=version_table_schema
        )
