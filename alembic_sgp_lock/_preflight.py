"""Read-only pre-flight checks of the version table against the migration scripts.

They run under the migration lock right after the version table is re-read,
and before Alembic runs any DDL, so that a state in which the upgrade would
fail halfway or do harm is reported with its fix instead.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError, to_tuple
from sqlalchemy.engine import Connection, Inspector

from ._errors import MigrationLockError
from ._log import logger

ERROR = "error"
WARNING = "warning"

VERSION_TABLE_MISSING = "version-table-missing"
VERSION_TABLE_ELSEWHERE = "version-table-elsewhere"
VERSION_COLUMN_TOO_SHORT = "version-column-too-short"
DATABASE_AHEAD = "database-ahead"
MULTIPLE_HEADS = "multiple-heads"
DUPLICATE_VERSION_ROWS = "duplicate-version-rows"
ANCESTOR_VERSION_ROWS = "ancestor-version-rows"
HALF_APPLIED_REVISION = "half-applied-revision"
UNKNOWN_TARGET = "unknown-target"
# A relative target (+2, -1, ae10+2) depends on the current revision, so it is
# not looked up in the scripts.
RELATIVE_TARGET = re.compile(r"^[-+]\d+$|^\w+[-+]\d+$")

# At most this many table names are listed in a message.
LISTED_TABLES_MAX = 10


@dataclass(frozen=True)
class Finding:
    """One problem found by a pre-flight check, with the command that fixes it."""

    code: str
    severity: str
    message: str
    fix: str
    revisions: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Return the finding as a JSON-ready dictionary."""
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
            "revisions": list(self.revisions),
            "objects": list(self.objects),
        }


@dataclass(frozen=True)
class VersionTable:
    """The version table as ``context.configure()`` names it."""

    name: str = "alembic_version"
    schema: str | None = None

    def qualified(self, schema: str | None = None) -> str:
        """Return ``schema.name``, or the bare name without a schema."""
        schema = self.schema if schema is None else schema
        return f"{schema}.{self.name}" if schema else self.name


@dataclass(frozen=True)
class PreflightReport:
    """Everything the checks found, and what an upgrade should do about it."""

    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == ERROR)

    @property
    def skip_upgrade(self) -> bool:
        """True when the database is ahead and MIGRATION_ON_UNKNOWN_REVISION is ``skip``."""
        return any(
            finding.code == DATABASE_AHEAD and finding.severity == WARNING
            for finding in self.findings
        )

    def raise_for_errors(self) -> None:
        """Raise :class:`DatabaseAheadError` or :class:`PreflightError` for any error finding."""
        errors = self.errors
        if not errors:
            return
        ahead = [finding for finding in errors if finding.code == DATABASE_AHEAD]
        if ahead:
            raise DatabaseAheadError(errors, ahead[0].revisions)
        raise PreflightError(errors)


class InvalidConfigurationError(MigrationLockError):
    """The command line lacks a value it needs, or has one that cannot be used."""


class PreflightError(MigrationLockError):
    """A pre-flight check found a state in which the upgrade would fail or do harm."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = tuple(findings)
        lines = [
            f"Pre-flight checks failed; nothing was migrated ({len(self.findings)} error(s)):"
        ]
        for finding in self.findings:
            lines.append(f"[{finding.code}] {finding.message} Fix: {finding.fix}")
        super().__init__("\n".join(lines))


class DatabaseAheadError(PreflightError):
    """The version table contains revisions that the migration scripts do not."""

    def __init__(self, findings: Sequence[Finding], revisions: Sequence[str]) -> None:
        self.revisions = tuple(revisions)
        super().__init__(findings)


def run_checks(
    connection: Connection,
    script: ScriptDirectory,
    rows: Sequence[str],
    *,
    version_table: VersionTable,
    target: str | None,
    on_unknown_revision: str,
) -> PreflightReport:
    """Run every check and return what they found; nothing is written.

    :param rows: the ``version_num`` values read from the version table,
        duplicates included.
    :param target: the revision the command migrates to (``head``,
        ``heads``, ``branch@head`` or an id), or None when not migrating.
    :param on_unknown_revision: ``fail`` or ``skip``, from
        ``MIGRATION_ON_UNKNOWN_REVISION``.
    """
    with connection.begin() as transaction:
        inspector = sa.inspect(connection)
        findings = list(_table_findings(connection, inspector, script, version_table))
        transaction.rollback()
    findings.extend(_row_findings(script, rows, on_unknown_revision))
    if target is not None:
        findings.extend(_target_findings(script, target))
    if target == "head":
        findings.extend(_heads_findings(script))
    return PreflightReport(tuple(findings))


def check_target(script: ScriptDirectory, target: str | None) -> None:
    """Raise :class:`PreflightError` when ``target`` names no revision of the scripts.

    It needs no database, so a command can reject a mistyped target before it
    waits for the lock.
    """
    if target is None:
        return
    report = PreflightReport(tuple(_target_findings(script, target)))
    report.raise_for_errors()


def _target_findings(script: ScriptDirectory, target: str) -> Iterator[Finding]:
    if target in ("head", "heads", "base") or RELATIVE_TARGET.match(target):
        return
    try:
        script.get_revisions(target)
    except (CommandError, ResolutionError) as error:
        yield Finding(
            code=UNKNOWN_TARGET,
            severity=ERROR,
            message=f"The target revision {target!r} is not in the migration scripts: {error}",
            fix=(
                "pass a revision id that `alembic history` lists, a branch label with "
                "@head, or head"
            ),
            revisions=(target,),
        )


def _table_findings(
    connection: Connection,
    inspector: Inspector,
    script: ScriptDirectory,
    version_table: VersionTable,
) -> Iterator[Finding]:
    if inspector.has_table(version_table.name, schema=version_table.schema):
        yield from _column_findings(connection, inspector, script, version_table)
        return

    # Only PostgreSQL has several schemas inside one database. A MySQL schema
    # is a database of its own, usually another application's.
    elsewhere: list[str] = []
    if connection.dialect.name == "postgresql":
        elsewhere = _schemas_containing(inspector, version_table)
    if elsewhere:
        yield _elsewhere_finding(connection, version_table, elsewhere)
        return

    tables = sorted(inspector.get_table_names(schema=version_table.schema))
    if not tables:
        return
    listed = ", ".join(tables[:LISTED_TABLES_MAX])
    if len(tables) > LISTED_TABLES_MAX:
        listed += f" and {len(tables) - LISTED_TABLES_MAX} more"
    yield Finding(
        code=VERSION_TABLE_MISSING,
        severity=ERROR,
        message=(
            f"The version table {version_table.qualified()} does not exist, but the database "
            f"already has {len(tables)} table(s): {listed}. An upgrade would run every "
            "revision again on top of them."
        ),
        fix=(
            "record the revision that the existing tables match, without running it: "
            "`alembic stamp <revision>` (`alembic stamp head` if they match the latest "
            "scripts)"
        ),
        objects=tuple(tables),
    )


def _schemas_containing(inspector: Inspector, version_table: VersionTable) -> list[str]:
    found = []
    for schema in inspector.get_schema_names():
        if schema == version_table.schema or schema == "information_schema":
            continue
        if inspector.has_table(version_table.name, schema=schema):
            found.append(schema)
    return found


def _elsewhere_finding(
    connection: Connection, version_table: VersionTable, schemas: Sequence[str]
) -> Finding:
    places = ", ".join(version_table.qualified(schema) for schema in schemas)
    consequence = (
        "An upgrade would create a new, empty version table and run every revision again."
    )
    search_path = _search_path(connection)
    if version_table.schema is not None:
        problem = (
            f"The version table {version_table.qualified()} does not exist, but {places} does."
        )
    elif search_path is not None:
        problem = (
            f"The version table {version_table.name} is not visible through the connection's "
            f"search_path ({search_path}), but {places} exists."
        )
    else:
        problem = (
            f"The version table {version_table.name} does not exist in the default schema, "
            f"but {places} exists."
        )
    fix = (
        f"pass version_table_schema={schemas[0]!r} to context.configure() in env.py, and "
        f"--version-table-schema {schemas[0]} to alembic-sgp-lock"
    )
    if search_path is not None:
        destination = version_table.schema or "<a schema on the search_path>"
        fix += f"; or move the table: ALTER TABLE {places.split(', ')[0]} SET SCHEMA {destination}"
    return Finding(
        code=VERSION_TABLE_ELSEWHERE,
        severity=ERROR,
        message=f"{problem} {consequence}",
        fix=fix,
        objects=tuple(version_table.qualified(schema) for schema in schemas),
    )


def _search_path(connection: Connection) -> str | None:
    if connection.dialect.name != "postgresql":
        return None
    return str(connection.execute(sa.text("SHOW search_path")).scalar())


def _column_findings(
    connection: Connection,
    inspector: Inspector,
    script: ScriptDirectory,
    version_table: VersionTable,
) -> Iterator[Finding]:
    # SQLite stores any length in a VARCHAR(n) column, so only servers that
    # enforce the declared length need this check.
    if connection.dialect.name == "sqlite":
        return
    columns = inspector.get_columns(version_table.name, schema=version_table.schema)
    column = next((column for column in columns if column["name"] == "version_num"), None)
    length = getattr(column["type"], "length", None) if column is not None else None
    revisions = [revision.revision for revision in script.walk_revisions()]
    if length is None or not revisions:
        return
    too_long = sorted(revision for revision in revisions if len(revision) > length)
    if not too_long:
        return
    longest = max(len(revision) for revision in too_long)
    yield Finding(
        code=VERSION_COLUMN_TOO_SHORT,
        severity=ERROR,
        message=(
            f"{version_table.qualified()}.version_num is VARCHAR({length}), shorter than "
            f"{len(too_long)} revision id(s) in the scripts, the longest {longest} "
            f"characters: {', '.join(too_long)}. Alembic would fail writing such a revision, "
            "after its DDL had run."
        ),
        fix=_widen_column_sql(connection.dialect.name, version_table.qualified(), longest),
        revisions=tuple(too_long),
        objects=(f"{version_table.qualified()}.version_num",),
    )


def _widen_column_sql(dialect: str, table: str, length: int) -> str:
    if dialect in ("mysql", "mariadb"):
        return f"ALTER TABLE {table} MODIFY version_num VARCHAR({length}) NOT NULL"
    return f"ALTER TABLE {table} ALTER COLUMN version_num TYPE VARCHAR({length})"


def _row_findings(
    script: ScriptDirectory, rows: Sequence[str], on_unknown_revision: str
) -> Iterator[Finding]:
    known = {revision.revision: revision for revision in script.walk_revisions()}
    unknown = sorted({row for row in rows if row not in known})
    if unknown:
        skip = on_unknown_revision == "skip"
        yield Finding(
            code=DATABASE_AHEAD,
            severity=WARNING if skip else ERROR,
            message=(
                f"The database is at revision(s) {', '.join(unknown)}, which these migration "
                "scripts do not contain: the database is ahead of the code, for example after "
                "the application was rolled back."
                + (" MIGRATION_ON_UNKNOWN_REVISION=skip: migrating nothing." if skip else "")
            ),
            fix=(
                "deploy the code that contains these revisions"
                + (
                    ""
                    if skip
                    else ", or set MIGRATION_ON_UNKNOWN_REVISION=skip to let this version "
                    "start without migrating"
                )
                + "; `alembic downgrade` must run from the newer code"
            ),
            revisions=tuple(unknown),
        )

    duplicates = sorted(row for row, count in Counter(rows).items() if count > 1)
    if duplicates:
        yield Finding(
            code=DUPLICATE_VERSION_ROWS,
            severity=ERROR,
            message=(
                f"The version table contains revision(s) {', '.join(duplicates)} more than "
                "once. Alembic would fail when it updates that row."
            ),
            fix=f"alembic stamp --purge {' '.join(_consistent_heads(known, rows))}",
            revisions=tuple(duplicates),
        )

    pairs = _ancestor_pairs(known, rows)
    if pairs:
        described = "; ".join(f"{older} is an ancestor of {newer}" for older, newer in pairs)
        yield Finding(
            code=ANCESTOR_VERSION_ROWS,
            severity=ERROR,
            message=(
                f"The version table rows are not a set of heads: {described}. Each row must "
                "be the head of a separate branch."
            ),
            fix=f"alembic stamp --purge {' '.join(_consistent_heads(known, rows))}",
            revisions=tuple(sorted({revision for pair in pairs for revision in pair})),
        )


def _ancestors(known: dict[str, Any], revision: str) -> set[str]:
    # Only down_revision links count: a depends_on target legitimately stays
    # in the version table as the head of its own branch.
    seen: set[str] = set()
    pending = list(to_tuple(known[revision].down_revision, default=()))
    while pending:
        current = pending.pop()
        if current in seen or current not in known:
            continue
        seen.add(current)
        pending.extend(to_tuple(known[current].down_revision, default=()))
    return seen


def _ancestor_pairs(known: dict[str, Any], rows: Sequence[str]) -> list[tuple[str, str]]:
    present = sorted({row for row in rows if row in known})
    pairs: list[tuple[str, str]] = []
    for newer in present:
        ancestors = _ancestors(known, newer)
        pairs.extend((older, newer) for older in present if older in ancestors)
    return pairs


def _consistent_heads(known: dict[str, Any], rows: Sequence[str]) -> list[str]:
    present = sorted({row for row in rows if row in known})
    older = {older for older, _ in _ancestor_pairs(known, rows)}
    return [row for row in present if row not in older] or ["<revision>"]


def _heads_findings(script: ScriptDirectory) -> Iterator[Finding]:
    heads = sorted(script.get_heads())
    if len(heads) < 2:
        return
    yield Finding(
        code=MULTIPLE_HEADS,
        severity=ERROR,
        message=(
            f"The migration scripts have {len(heads)} heads ({', '.join(heads)}) and the "
            "target is 'head', which names one."
        ),
        fix=(
            'alembic merge heads -m "merge heads", then deploy the merge revision; or '
            "target 'heads' or '<branch label>@head' explicitly"
        ),
        revisions=tuple(heads),
    )


def log_report(report: PreflightReport) -> None:
    """Log each warning finding, or one line when the checks found nothing.

    Error findings are not logged here because the error raised for them
    contains every one of them.
    """
    for finding in report.findings:
        if finding.severity == WARNING:
            logger.warning("Pre-flight warning [%s]: %s", finding.code, finding.message)
    if not report.findings:
        logger.info("Pre-flight checks passed")


def check_before_upgrade(
    connection: Connection,
    script: ScriptDirectory,
    rows: Sequence[str],
    *,
    version_table: VersionTable,
    target: str | None,
    on_unknown_revision: str,
    more_findings: Sequence[Finding] = (),
) -> bool:
    """Run the checks before an upgrade; return False when the upgrade must migrate nothing.

    ``more_findings`` come from checks made elsewhere, such as the ledger's
    checksums, and are logged and raised in the same report.

    :raises DatabaseAheadError: the database contains an unknown revision and
        ``on_unknown_revision`` is ``fail``.
    :raises PreflightError: any other check found an error.
    """
    report = run_checks(
        connection,
        script,
        rows,
        version_table=version_table,
        target=target,
        on_unknown_revision=on_unknown_revision,
    )
    report = PreflightReport(report.findings + tuple(more_findings))
    log_report(report)
    report.raise_for_errors()
    if report.skip_upgrade:
        logger.warning(
            "Skipping the upgrade: the database is ahead of these migration scripts and "
            "MIGRATION_ON_UNKNOWN_REVISION is skip"
        )
        return False
    return True
