"""The plugin's own sub-commands of ``alembic-sgp-lock``, each a function of an Alembic Config.

Alembic's ``CommandLine.register_command`` turns each function's parameters
into positional arguments and options; ``cli.py`` adds the help texts.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from . import _compat
from ._backend import backend_for
from ._errors import MigrationLockError
from ._exit_codes import ExitCode, exit_code_for
from ._ledger import Ledger, checksum_findings
from ._marker import HalfAppliedMarker, read_marker
from ._preflight import (
    ERROR,
    HALF_APPLIED_REVISION,
    Finding,
    InvalidConfigurationError,
    PreflightError,
    PreflightReport,
    VersionTable,
    run_checks,
)
from ._recovery import clear_half_applied
from ._settings import Settings, without_password
from ._state import read_heads
from ._status import read_lock_status

OUTPUT_FORMATS = ("text", "json")


def preflight(config: Config, target: str = "head", output_format: str = "text") -> None:
    """Run the pre-flight checks without migrating; exit non-zero on an error finding."""
    options = _Options.from_config(config)
    settings = Settings.from_env()
    script = ScriptDirectory.from_config(config)
    with _connect(options) as connection:
        rows = read_heads(connection, options.version_table.name, options.version_table.schema)
        report = run_checks(
            connection,
            script,
            rows,
            version_table=options.version_table,
            target=target,
            on_unknown_revision=settings.on_unknown_revision,
        )
        drift = ledger_drift(connection, script, rows, options, settings)
        marker = read_marker(
            connection,
            marker_table_name=settings.marker_table,
            version_table=options.version_table.name,
            version_table_schema=options.version_table.schema,
        )
        half_applied = [] if marker is None else [half_applied_finding(marker)]
        report = PreflightReport(report.findings + tuple(drift) + tuple(half_applied))
    status = ExitCode.OK
    try:
        report.raise_for_errors()
    except PreflightError as error:
        status = exit_code_for(error)
    errors = len(report.errors)
    warnings = len(report.findings) - errors
    if output_format == "json":
        document = {
            "ok": status == ExitCode.OK,
            "exit_code": int(status),
            "database": options.safe_url,
            "version_table": options.version_table.qualified(),
            "target": target,
            "revisions": list(rows),
            "errors": errors,
            "warnings": warnings,
            "findings": [finding.as_dict() for finding in report.findings],
        }
        _write(config, json.dumps(document, indent=2))
    else:
        lines = [
            f"Pre-flight checks on {options.safe_url}, version table "
            f"{options.version_table.qualified()}, target {target}",
            f"Database revision(s): {', '.join(rows) if rows else 'none'}",
        ]
        for finding in report.findings:
            lines.append(f"{finding.severity} [{finding.code}] {finding.message}")
            lines.append(f"  fix: {finding.fix}")
        lines.append(f"{errors} error(s), {warnings} warning(s)")
        _write(config, "\n".join(lines))
    if status != ExitCode.OK:
        raise SystemExit(int(status))


def ledger_drift(
    connection: Connection,
    script: ScriptDirectory,
    rows: Sequence[str],
    options: _Options,
    settings: Settings,
) -> list[Finding]:
    """Return the ledger's ``checksum-mismatch`` findings for the applied revisions."""
    book = Ledger(settings.ledger_table, options.version_table.schema, script)
    return checksum_findings(connection, book, rows, settings.on_checksum_mismatch)


def lock_status(config: Config, output_format: str = "text") -> None:
    """Show whether the migration lock is held now, and by which session."""
    options = _Options.from_config(config)
    settings = Settings.from_env()
    with _connect(options) as connection:
        backend = backend_for(
            connection,
            version_table=options.version_table.name,
            version_table_schema=options.version_table.schema,
            lock_name=settings.lock_name,
        )
        status = read_lock_status(connection, backend)
    if output_format == "json":
        _write(config, json.dumps(status.as_dict(), indent=2))
    else:
        _write(config, status.describe())


# argparse names a sub-command after the function; a Python name has no hyphen.
lock_status.__name__ = "lock-status"


def _write(config: Config, text: str) -> None:
    # Not config.print_stdout: --quiet must not hide the one output a
    # deploy pipeline reads.
    config.stdout.write(text + "\n")
    config.stdout.flush()


# The sources of the command's own URL, in order of precedence.
URL_SOURCES = (
    "pass the URL with --database-url, set MIGRATION_DATABASE_URL, or set sqlalchemy.url "
    "in the ini section"
)


class _Options:
    """The database and version table that this command's own connection uses."""

    def __init__(self, url: str | None, version_table: VersionTable) -> None:
        self.url = url
        self.version_table = version_table

    @classmethod
    def from_config(cls, config: Config) -> _Options:
        namespace = config.cmd_opts if config.cmd_opts is not None else Namespace()
        url = (
            getattr(namespace, "database_url", None)
            or os.environ.get("MIGRATION_DATABASE_URL")
            or config.get_main_option("sqlalchemy.url")
        )
        table = VersionTable(
            getattr(namespace, "version_table", None) or "alembic_version",
            getattr(namespace, "version_table_schema", None),
        )
        return cls(url or None, table)

    @property
    def safe_url(self) -> str:
        if self.url is None:
            return "(no database URL)"
        try:
            return sa.engine.make_url(self.url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            return repr(without_password(self.url))

    def engine(self) -> Engine:
        """Build a NullPool engine for the URL; raise InvalidConfigurationError if unusable."""
        if self.url is None:
            raise InvalidConfigurationError(f"No database URL: {URL_SOURCES}")
        try:
            url = _compat.with_installed_driver(sa.engine.make_url(self.url))
            return sa.create_engine(url, poolclass=sa.pool.NullPool)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as error:
            # ImportError: the URL names a driver that is not installed.
            raise InvalidConfigurationError(
                f"The database URL {self.safe_url} cannot be used: {error}. "
                f"{URL_SOURCES[0].upper()}{URL_SOURCES[1:]}"
            ) from error


def connect_failure(options: _Options, error: sa.exc.DBAPIError) -> MigrationLockError:
    """Return the error to raise when the command's own connection cannot be opened."""
    first_line = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    return MigrationLockError(
        f"Could not connect to {options.safe_url}: {first_line}. Check the server, "
        f"the database name and the credentials, and {URL_SOURCES}"
    )


@contextmanager
def _connect(options: _Options, *, explain_failure: bool = True) -> Iterator[Connection]:
    """Connect with the command's own URL.

    With ``explain_failure``, a failed connection becomes a MigrationLockError
    that names what to check. Without it, the driver's error is raised as is,
    for a caller that retries transient errors.
    """
    engine = options.engine()
    try:
        try:
            connection = engine.connect()
        except sa.exc.DBAPIError as error:
            if not explain_failure:
                raise
            raise connect_failure(options, error) from error
        with connection:
            yield connection
    finally:
        engine.dispose()


def clear_half_applied_command(
    config: Config, stamp: str | None = None, lock_timeout: float = 0.0
) -> None:
    """Delete the half-applied marker after the schema was repaired by hand."""
    options = _Options.from_config(config)
    if options.url is None:
        options.engine()  # raises InvalidConfigurationError naming the fix
    marker = clear_half_applied(
        config,
        url=options.url,
        stamp=stamp,
        version_table=options.version_table.name,
        version_table_schema=options.version_table.schema,
        lock_timeout=lock_timeout,
    )
    done = f"Cleared the half-applied marker of revision {marker.revision}"
    _write(config, done + (f" and stamped {stamp}" if stamp else ""))


clear_half_applied_command.__name__ = "clear-half-applied"


def ledger(config: Config, output_format: str = "text") -> None:
    """Show the revision ledger: every applied step, oldest first."""
    options = _Options.from_config(config)
    settings = Settings.from_env()
    book = Ledger(
        settings.ledger_table, options.version_table.schema, ScriptDirectory.from_config(config)
    )
    with _connect(options) as connection:
        rows = book.history(connection)
    if output_format == "json":
        _write(config, json.dumps(rows, indent=2, default=_json_value))
        return
    if not rows:
        _write(config, f"The ledger {settings.ledger_table} is empty or does not exist.")
        return
    columns = [
        "id",
        "revision",
        "direction",
        "outcome",
        "finished_at",
        "duration_ms",
        "host",
        "pid",
        "database_user",
        "checksum",
    ]
    table = [columns] + [[_text_value(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in table
    ]
    _write(config, "\n".join(line.rstrip() for line in lines))


def accept_checksum(config: Config, revision: str, note: str | None = None) -> None:
    """Record the current file of an applied revision as reviewed and correct."""
    options = _Options.from_config(config)
    settings = Settings.from_env()
    book = Ledger(
        settings.ledger_table, options.version_table.schema, ScriptDirectory.from_config(config)
    )
    with _connect(options) as connection:
        checksum = book.accept(connection, revision, note)
    _write(config, f"Accepted the current file of {revision} as applied: {checksum}")


accept_checksum.__name__ = "accept-checksum"


def _as_utc(value: datetime) -> datetime:
    # The ledger stores UTC without a time zone, as every backend's DATETIME can.
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return _as_utc(value).isoformat()
    return str(value)


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return _as_utc(value).isoformat(sep=" ", timespec="seconds")
    return str(value)


def half_applied_finding(marker: HalfAppliedMarker) -> Finding:
    """Return the ``half-applied-revision`` finding for a marker that a failed run left."""
    destination = marker.destination_revisions or "base"
    return Finding(
        code=HALF_APPLIED_REVISION,
        severity=ERROR,
        message=(
            f"Revision {marker.revision} ({marker.direction}) was started at "
            f"{marker.started_at:%Y-%m-%d %H:%M:%S} UTC by {marker.holder} and did not finish; "
            "part of it may be applied. Every upgrade is rejected until it is repaired."
        ),
        fix=(
            "compare the schema with the revision, then undo what took effect and run "
            "`alembic-sgp-lock clear-half-applied`, or finish it by hand and run "
            f"`alembic-sgp-lock clear-half-applied --stamp {destination}`"
        ),
        revisions=(marker.revision,),
    )
