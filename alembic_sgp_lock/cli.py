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
from collections.abc import Sequence
from typing import Any

from alembic.config import CommandLine, Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from ._commands import (
    OUTPUT_FORMATS,
    _connect,
    _Options,
    accept_checksum,
    clear_half_applied_command,
    connect_failure,
    ledger,
    ledger_drift,
    lock_status,
    preflight,
)
from ._errors import MigrationLockError
from ._exit_codes import exit_code_for
from ._lock import hold_lock
from ._log import logger
from ._preflight import check_before_upgrade, check_target
from ._retry import Attempt, run_with_retries
from ._settings import Settings
from ._signals import stop_on_signals
from ._state import format_heads, read_heads

# Alembic commands that write the version table, and so run under the lock.
LOCKED_COMMANDS = frozenset({"upgrade", "downgrade", "stamp"})


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
        self.register_command(clear_half_applied_command)
        subparser = self._subparser(clear_half_applied_command)
        subparser.add_argument(
            "--stamp",
            metavar="REVISION",
            help=(
                "also write REVISION to the version table, after finishing the marked "
                "revision by hand (default: leave the version table as it is)"
            ),
        )
        subparser.add_argument(
            "--lock-timeout",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="seconds to wait for a running migration's lock (default: 0, fail at once)",
        )
        self.register_command(ledger)
        self._add_format_option(self._subparser(ledger))
        self.register_command(accept_checksum)
        self._subparser(accept_checksum).add_argument(
            "--note",
            help="why the change was accepted, stored in the ledger row (at most 255 characters)",
        )

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
            status = int(exit_code_for(error))
            if getattr(options, "output_format", "text") == "json":
                # A pipeline that parses standard output still gets one document.
                failure = {"ok": False, "exit_code": status, "error": str(error)}
                config.stdout.write(json.dumps(failure, indent=2) + "\n")
                config.stdout.flush()
            sys.stderr.write(f"FAILED: {error}\n")
            sys.stderr.flush()
            raise SystemExit(status) from error

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
                "Pass --database-url, set MIGRATION_DATABASE_URL or set sqlalchemy.url so "
                "the command locks even when env.py does not call "
                "alembic_sgp_lock.run_migrations()",
                command,
            )
            self._call(config, options)
            return

        connected = False

        def attempt_command(attempt: Attempt) -> None:
            nonlocal connected
            connected = False
            with _connect(own, explain_failure=False) as connection:
                connected = True
                try:
                    self._run_under_lock(config, options, connection, own, settings, attempt)
                except BaseException:
                    connection.invalidate()
                    raise

        try:
            with stop_on_signals():
                run_with_retries(attempt_command, settings)
        except DBAPIError as error:
            # A permanent failure to connect, such as a database that does not
            # exist, is not retried; explain it like the other commands do.
            if connected:
                raise
            raise connect_failure(own, error) from error

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
        if command == "upgrade":
            # Before the lock: a mistyped target must not wait behind a migration.
            check_target(ScriptDirectory.from_config(config), getattr(options, "revision", None))
        if command == "upgrade" and settings.lock_enabled:
            heads = _heads_if_at_target(config, options, connection, own)
            if heads is not None:
                logger.info(
                    "Database is already at %s; running Alembic's command without the "
                    "command's own lock",
                    format_heads(heads),
                )
                attempt.migrations_started = True
                attempt.transactional_ddl = False
                self._call(config, options)
                return
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
                script = ScriptDirectory.from_config(config)
                if not check_before_upgrade(
                    connection,
                    script,
                    rows,
                    version_table=own.version_table,
                    target=getattr(options, "revision", None),
                    on_unknown_revision=settings.on_unknown_revision,
                    more_findings=(
                        ledger_drift(connection, script, rows, own, settings)
                        if settings.ledger
                        else []
                    ),
                ):
                    return
            # Retries cover connecting, locking and the checks. Once Alembic's
            # command starts, this layer cannot know what it committed.
            attempt.migrations_started = True
            attempt.transactional_ddl = False
            self._call(config, options)


def _heads_if_at_target(
    config: Config, options: Namespace, connection: Connection, own: _Options
) -> tuple[str, ...] | None:
    """Return the database's heads when ``upgrade head`` or ``upgrade heads`` has nothing to do.

    Any other target, duplicate version rows and a script directory with
    several heads under ``upgrade head`` return None, so that the command takes
    the lock and the pre-flight checks or Alembic report them.
    """
    target = getattr(options, "revision", None)
    if target not in ("head", "heads"):
        return None
    heads = read_heads(connection, own.version_table.name, own.version_table.schema)
    if not heads or len(set(heads)) != len(heads):
        return None
    script_heads = set(ScriptDirectory.from_config(config).get_heads())
    if target == "head" and len(script_heads) != 1:
        return None
    return heads if set(heads) == script_heads else None


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
