"""``run_migrations()``: the whole body of a locked ``env.py``."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic import context
from alembic.runtime.migration import MigrationInfo
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import URL, Connection, Engine, make_url

from . import _compat
from ._errors import HalfAppliedRevisionError, MigrationLockError
from ._ledger import Ledger, StepRecorder, checksum_findings, utc_now
from ._lock import commit_open_transaction, hold_lock
from ._log import logger
from ._marker import MarkerRecorder, read_marker
from ._pooler import check_not_transaction_pooled
from ._preflight import PreflightReport, VersionTable, check_before_upgrade, log_report
from ._retry import Attempt, run_with_retries
from ._session import ddl_timeouts, prepare_connection, set_client_keepalives
from ._settings import Settings
from ._signals import stop_on_signals
from ._state import format_heads, read_heads
from ._transaction_lock import (
    REJECTED_AUTOCOMMIT,
    migrate_in_one_transaction,
    reject_transaction_per_migration,
)

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
    if options["sqlalchemy.url"].get_dialect().is_async:
        from sqlalchemy.ext.asyncio import async_engine_from_config

        return async_engine_from_config(options, prefix="sqlalchemy.", poolclass=pool.NullPool)
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
    transaction_scoped = settings.lock_enabled and settings.lock_mode == "transaction"
    if transaction_scoped:
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
                    logger.info(
                        "Database is already at %s; nothing to migrate, lock not taken",
                        format_heads(heads),
                    )
                    return
                if transaction_scoped:
                    migrate_in_one_transaction(
                        connection,
                        settings=settings,
                        version_table=version_table,
                        version_table_schema=version_table_schema,
                        timeout=min(settings.lock_timeout, attempt.remaining()),
                        # Alembic reads the heads itself, inside the locked transaction.
                        migrate=lambda locked: _configure_and_run(
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
                    _migrate_under_lock(
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


def _migrate_under_lock(
    connection: Connection,
    target_metadata: Any,
    configure_options: dict[str, Any],
    attempt: Attempt,
    version_table: str,
    version_table_schema: str | None,
    settings: Settings,
) -> None:
    # Another instance may have migrated while this one waited.
    heads_before = read_heads(connection, version_table, version_table_schema)
    logger.info("Revision before migrating: %s", format_heads(heads_before))
    marker_table = settings.marker_table
    marker = read_marker(
        connection,
        marker_table_name=marker_table,
        version_table=version_table,
        version_table_schema=version_table_schema,
    )
    if marker is not None:
        raise HalfAppliedRevisionError(marker, marker_table)
    environment = _compat.current_environment()
    if (
        environment is not None
        and _compat.command_name(environment) == "upgrade"
        and not check_before_upgrade(
            connection,
            environment.script,
            heads_before,
            version_table=VersionTable(version_table, version_table_schema),
            target=_compat.destination_revision(environment),
            on_unknown_revision=settings.on_unknown_revision,
        )
    ):
        return
    ledger = None
    if settings.ledger:
        ledger = Ledger(settings.ledger_table, version_table_schema, context.script)
        _check_checksums(connection, ledger, heads_before, settings)
        ledger.prepare(connection, heads_before)
    marker_recorder = MarkerRecorder(
        connection,
        marker_table_name=marker_table,
        version_table=version_table,
        version_table_schema=version_table_schema,
    )
    ledger_recorder = ledger.step_recorder() if ledger is not None else None
    started = time.monotonic()
    _configure_and_run(
        connection, target_metadata, configure_options, attempt, ledger_recorder, marker_recorder
    )
    commit_open_transaction(connection)
    heads_after = read_heads(connection, version_table, version_table_schema)
    logger.info(
        "Revision after migrating: %s (%.2f s)",
        format_heads(heads_after),
        time.monotonic() - started,
    )


def _check_checksums(
    connection: Connection, ledger: Ledger, heads: tuple[str, ...], settings: Settings
) -> None:
    findings = checksum_findings(connection, ledger, heads, settings.on_checksum_mismatch)
    report = PreflightReport(tuple(findings))
    if findings:
        log_report(report)
    report.raise_for_errors()


def _configure_and_run(
    connection: Connection,
    target_metadata: Any,
    configure_options: dict[str, Any],
    attempt: Attempt | None,
    ledger_recorder: StepRecorder | None = None,
    recorder: MarkerRecorder | None = None,
) -> None:
    options = dict(configure_options)
    callbacks: list[Callable[..., None]] = [_step_logger(ledger_recorder)]
    if recorder is not None:
        # The marker's callback deletes it in the version write's transaction.
        callbacks.append(recorder.on_version_apply)
    # Alembic accepts one callable or a sequence of them.
    user_callbacks = options.get("on_version_apply")
    if callable(user_callbacks):
        callbacks.append(user_callbacks)
    elif user_callbacks:
        callbacks.extend(user_callbacks)
    options["on_version_apply"] = callbacks
    context.configure(connection=connection, target_metadata=target_metadata, **options)
    if connection.in_transaction():
        # Only MIGRATION_LOCK_MODE=transaction migrates inside a transaction of its own.
        _compat.forbid_autocommit_block(context.get_context(), REJECTED_AUTOCOMMIT)
    transactional_ddl = bool(context.get_context().impl.transactional_ddl)
    if attempt is not None:
        attempt.transactional_ddl = transactional_ddl
        attempt.migrations_started = True
    if recorder is not None and not transactional_ddl:
        if _compat.replace_steps_function(context.get_context(), recorder.wrap_steps):
            recorder.listen()
        else:
            logger.warning(
                "This Alembic release cannot be hooked before each revision; "
                "half-applied revisions will not be marked"
            )
            recorder = None
    else:
        recorder = None
    try:
        with context.begin_transaction():
            context.run_migrations()
    except Exception as error:
        if recorder is not None:
            recorder.record_failure(error)
        raise
    finally:
        if recorder is not None:
            recorder.stop_listening()


def _step_logger(recorder: StepRecorder | None) -> Callable[..., None]:
    step_started = time.monotonic()
    step_started_at = utc_now()

    def on_version_apply(
        *, ctx: Any, step: MigrationInfo, heads: set[str], run_args: dict[str, Any]
    ) -> None:
        nonlocal step_started, step_started_at
        duration = time.monotonic() - step_started
        source = ", ".join(step.source_revision_ids) or "base"
        destination = ", ".join(step.destination_revision_ids) or "base"
        kind = "stamp" if step.is_stamp else "upgrade" if step.is_upgrade else "downgrade"
        logger.info("Applied %s %s -> %s in %.2f s", kind, source, destination, duration)
        if recorder is not None:
            # The migration's own connection, so the row shares the revision's transaction.
            recorder(ctx.connection, step, step_started_at, duration)
        step_started = time.monotonic()
        step_started_at = utc_now()

    return on_version_apply
