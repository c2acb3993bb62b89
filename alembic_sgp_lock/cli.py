"""The ``alembic-sgp-lock`` command: Alembic's commands plus ``preflight`` and ``lock-status``.

``upgrade``, ``downgrade`` and ``stamp`` run under the migration lock, taken
on a connection of the command's own, so a project whose ``env.py`` does not
use :func:`alembic_sgp_lock.run_migrations` is protected too. When ``env.py``
does use it, the hook runs in the same thread and finds the lock already held
by this process, so it neither locks twice nor waits for itself.
"""

from __future__ import annotations

import json
import logging.config
import os
import sys
from argparse import ArgumentParser, Namespace
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic.config import CommandLine, Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from ._backend import backend_for
from ._errors import MigrationLockError
from ._exit_codes import ExitCode, exit_code_for
from ._hook import _with_installed_driver
from ._lock import hold_lock
from ._log import logger
from ._preflight import (
    InvalidConfigurationError,
    PreflightError,
    VersionTable,
    check_before_upgrade,
    run_checks,
)
from ._retry import Attempt, run_with_retries
from ._settings import Settings
from ._state import read_heads
from ._status import read_lock_status

# Alembic commands that write the version table, and so run under the lock.
LOCKED_COMMANDS = frozenset({"upgrade", "downgrade", "stamp"})
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


class _Options:
    """The database and version table that this command's own connection uses."""

    def __init__(self, url: str | None, version_table: VersionTable) -> None:
        self.url = url
        self.version_table = version_table

    @classmethod
    def from_config(cls, config: Config) -> _Options:
        namespace = config.cmd_opts if config.cmd_opts is not None else Namespace()
        url = getattr(namespace, "database_url", None) or config.get_main_option("sqlalchemy.url")
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
            return "(an invalid database URL)"

    def engine(self) -> Engine:
        """Build a NullPool engine for the URL; raise InvalidConfigurationError if unusable."""
        if self.url is None:
            raise InvalidConfigurationError(
                "No database URL: pass --database-url to alembic-sgp-lock, or set "
                "sqlalchemy.url in the ini section"
            )
        try:
            url = _with_installed_driver(sa.engine.make_url(self.url))
            return sa.create_engine(url, poolclass=sa.pool.NullPool)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as error:
            raise InvalidConfigurationError(
                f"The database URL {self.safe_url} cannot be used: {error}. Pass the real URL "
                "with --database-url, or fix sqlalchemy.url in the ini section"
            ) from error


@contextmanager
def _connect(options: _Options) -> Iterator[Connection]:
    engine = options.engine()
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


class SgpCommandLine(CommandLine):
    """Alembic's command line with the plugin's options, commands and exit statuses."""

    def __init__(self, prog: str | None = None) -> None:
        super().__init__(prog=prog)
        self._add_global_options(self.parser)
        self.register_command(preflight)
        subparser = self._subparser(preflight)
        subparser.add_argument(
            "--target",
            default="head",
            help="revision the upgrade would go to, for the multiple-heads check (default: head)",
        )
        self._add_format_option(subparser)
        self.register_command(lock_status)
        self._add_format_option(self._subparser(lock_status))

    @staticmethod
    def _add_global_options(parser: ArgumentParser) -> None:
        parser.add_argument(
            "--database-url",
            help=(
                "database URL of alembic-sgp-lock's own connection (lock, pre-flight checks, "
                "lock status); defaults to sqlalchemy.url from the ini section"
            ),
        )
        parser.add_argument(
            "--version-table",
            default="alembic_version",
            help="version table that env.py passes to context.configure() (default: %(default)s)",
        )
        parser.add_argument(
            "--version-table-schema",
            help="schema of the version table, as env.py configures it (default: none)",
        )

    @staticmethod
    def _add_format_option(parser: ArgumentParser) -> None:
        parser.add_argument(
            "--format",
            dest="output_format",
            choices=OUTPUT_FORMATS,
            default="text",
            help="output as text for people or JSON for deploy pipelines (default: text)",
        )

    def _subparser(self, function: Any) -> ArgumentParser:
        parser: ArgumentParser = self.subparsers.choices[function.__name__]
        return parser

    def run_cmd(self, config: Config, options: Namespace) -> None:
        """Run one command; on failure print ``FAILED: ...`` and exit with its status."""
        function = options.cmd[0]
        _configure_logging(config)
        try:
            if function.__name__ in LOCKED_COMMANDS and not getattr(options, "sql", False):
                self._run_locked(config, options)
            else:
                self._call(config, options)
        except CommandError as error:
            if options.raiseerr:
                raise
            sys.stderr.write(f"FAILED: {error}\n")
            sys.stderr.flush()
            raise SystemExit(int(exit_code_for(error))) from error

    @staticmethod
    def _call(config: Config, options: Namespace) -> None:
        function, positional, keywords = options.cmd
        function(
            config,
            *[getattr(options, name, None) for name in positional],
            **{name: getattr(options, name, None) for name in keywords},
        )

    def _run_locked(self, config: Config, options: Namespace) -> None:
        command = options.cmd[0].__name__
        settings = Settings.from_env()
        if not settings.run_migrations:
            logger.info("RUN_MIGRATIONS is false: skipping %s without connecting", command)
            return
        if not settings.lock_enabled:
            logger.warning("MIGRATION_LOCK is false: running %s without a lock", command)
            self._call(config, options)
            return
        own = _Options.from_config(config)
        if own.url is None:
            # NOTE: without a URL only an env.py that calls run_migrations() locks.
            logger.warning(
                "No database URL for alembic-sgp-lock's own lock; running %s without it. "
                "Pass --database-url or set sqlalchemy.url so the command locks even when "
                "env.py does not call alembic_sgp_lock.run_migrations()",
                command,
            )
            self._call(config, options)
            return

        def attempt_command(attempt: Attempt) -> None:
            with _connect(own) as connection:
                try:
                    self._run_under_lock(config, options, connection, own, settings, attempt)
                except BaseException:
                    connection.invalidate()
                    raise

        run_with_retries(attempt_command, settings)

    def _run_under_lock(
        self,
        config: Config,
        options: Namespace,
        connection: Connection,
        own: _Options,
        settings: Settings,
        attempt: Attempt,
    ) -> None:
        command = options.cmd[0].__name__
        # NOTE: the hook in env.py skips its own lock only when its URL (host,
        # port, database) and version table give this lock's identity. If they
        # differ, it waits for this process until MIGRATION_LOCK_TIMEOUT.
        with hold_lock(
            connection,
            settings=settings,
            version_table=own.version_table.name,
            version_table_schema=own.version_table.schema,
            timeout=min(settings.lock_timeout, attempt.remaining()),
        ):
            if command == "upgrade":
                rows = read_heads(connection, own.version_table.name, own.version_table.schema)
                if not check_before_upgrade(
                    connection,
                    ScriptDirectory.from_config(config),
                    rows,
                    version_table=own.version_table,
                    target=getattr(options, "revision", None),
                    on_unknown_revision=settings.on_unknown_revision,
                ):
                    return
            # Retries cover connecting, locking and the checks. Once Alembic's
            # command starts, this layer cannot know what it committed.
            attempt.migrations_started = True
            attempt.transactional_ddl = False
            self._call(config, options)


def _configure_logging(config: Config) -> None:
    """Show the plugin's log lines before env.py configures logging, as env.py would."""
    if logging.getLogger().handlers:
        return
    path = config.config_file_name
    if path and os.path.exists(path) and config.file_config.has_section("formatters"):
        logging.config.fileConfig(path, disable_existing_loggers=False)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``alembic-sgp-lock`` with ``argv`` (default: ``sys.argv[1:]``) and exit."""
    try:
        SgpCommandLine(prog="alembic-sgp-lock").main(argv=argv)
    except MigrationLockError as error:
        # Raised outside run_cmd, while Alembic reads the configuration.
        sys.stderr.write(f"FAILED: {error}\n")
        raise SystemExit(int(exit_code_for(error))) from error


if __name__ == "__main__":
    main()
