"""Running Alembic's migrations on a connection that holds the migration lock.

Under the lock, a run re-reads the version table, stops on a half-applied
marker, runs the pre-flight and checksum checks, and then lets Alembic
migrate with callbacks that log each step and record it in the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationInfo
from sqlalchemy.engine import Connection

from . import _compat
from ._errors import HalfAppliedRevisionError
from ._ledger import Ledger, StepRecorder, checksum_findings, utc_now
from ._lock import commit_open_transaction
from ._log import logger
from ._marker import MarkerRecorder, read_marker
from ._preflight import (
    Finding,
    PreflightReport,
    VersionTable,
    check_before_upgrade,
    log_report,
)
from ._retry import Attempt
from ._settings import Settings
from ._state import format_heads, read_heads
from ._transaction_lock import REJECTED_AUTOCOMMIT


def migrate_under_lock(
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
        len(set(heads_before)) == len(heads_before)
        and _compat.pending_steps(environment, heads_before) == 0
        and not settings.ledger
    ):
        # Release the lock at once instead of running Alembic for nothing, so
        # the next waiter takes over sooner.
        logger.info(
            "Another instance migrated to %s while this one waited; nothing left to do",
            format_heads(heads_before),
        )
        return
    ledger = None
    drift: list[Finding] = []
    if settings.ledger:
        ledger = Ledger(settings.ledger_table, version_table_schema, context.script)
        drift = checksum_findings(connection, ledger, heads_before, settings.on_checksum_mismatch)
    if environment is not None and _compat.command_name(environment) == "upgrade":
        if not check_before_upgrade(
            connection,
            environment.script,
            heads_before,
            version_table=VersionTable(version_table, version_table_schema),
            target=_compat.destination_revision(environment),
            on_unknown_revision=settings.on_unknown_revision,
            more_findings=drift,
        ):
            return
    else:
        report_checksums(drift)
    if ledger is not None:
        ledger.prepare(connection, heads_before)

    marker_recorder = MarkerRecorder(
        connection,
        marker_table_name=marker_table,
        version_table=version_table,
        version_table_schema=version_table_schema,
    )
    ledger_recorder = ledger.step_recorder() if ledger is not None else None
    started = time.monotonic()
    configure_and_run(
        connection, target_metadata, configure_options, attempt, ledger_recorder, marker_recorder
    )

    commit_open_transaction(connection)
    heads_after = read_heads(connection, version_table, version_table_schema)
    logger.info(
        "Revision after migrating: %s (%.2f s)",
        format_heads(heads_after),
        time.monotonic() - started,
    )


def check_checksums(
    connection: Connection, ledger: Ledger, heads: tuple[str, ...], settings: Settings
) -> None:
    """Log a warning or raise, as ``MIGRATION_ON_CHECKSUM_MISMATCH`` sets, for edited revisions."""
    report_checksums(checksum_findings(connection, ledger, heads, settings.on_checksum_mismatch))


def report_checksums(findings: list[Finding]) -> None:
    """Log the checksum findings that are warnings and raise for those that are errors."""
    report = PreflightReport(tuple(findings))
    if findings:
        log_report(report)
    report.raise_for_errors()


def configure_and_run(
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
        if step.is_stamp:
            kind = "stamp"
        elif step.is_upgrade:
            kind = "upgrade"
        else:
            kind = "downgrade"
        logger.info("Applied %s %s -> %s in %.2f s", kind, source, destination, duration)
        if recorder is not None:
            # The migration's own connection, so the row shares the revision's transaction.
            recorder(ctx.connection, step, step_started_at, duration)
        step_started = time.monotonic()
        step_started_at = utc_now()

    return on_version_apply
