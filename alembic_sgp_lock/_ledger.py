"""The revision ledger: one row per applied step, with who, when, how long and a checksum.

The ledger is a table of its own beside the version table; Alembic's table is
never altered. A step's row is written through the migration's own
connection inside ``on_version_apply``, so on a database with transactional
DDL it commits or rolls back together with the revision.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import alembic
import sqlalchemy as sa
from alembic.runtime.migration import MigrationInfo
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from ._checksum import revision_checksum
from ._errors import MigrationLockError
from ._log import logger
from ._preflight import ERROR, WARNING, Finding

CHECKSUM_MISMATCH = "checksum-mismatch"

StepRecorder = Callable[[Connection, MigrationInfo, datetime, float], None]

# Values of the direction column.
UPGRADE = "upgrade"
DOWNGRADE = "downgrade"
STAMP = "stamp"
BASELINE = "baseline"
ACCEPT = "accept"
# Rows whose checksum states what the applied file contained.
CHECKSUM_SOURCES = (UPGRADE, BASELINE, ACCEPT)
# The words a drift message uses for the event that recorded the checksum.
RECORDED_BY_WORDS = {
    UPGRADE: "applied",
    BASELINE: "recorded as a baseline",
    ACCEPT: "accepted",
}


def utc_now() -> datetime:
    """Return the current UTC time without tzinfo, as every backend stores DATETIME alike."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def ledger_table(name: str, schema: str | None) -> sa.Table:
    """Return the ledger's table definition."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("revision", sa.String(255), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("checksum", sa.String(80)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("application_name", sa.String(255)),
        sa.Column("database_user", sa.String(255)),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("duration_ms", sa.Float),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("alembic_version", sa.String(32)),
        sa.Column("plugin_version", sa.String(32)),
        sa.Column("note", sa.String(255)),
        schema=schema,
    )


@dataclass(frozen=True)
class ChecksumDrift:
    """An applied revision whose file changed after it was applied."""

    revision: str
    path: str
    applied_at: datetime | None
    recorded_checksum: str
    current_checksum: str
    #: Direction of the ledger row that recorded the checksum: upgrade, baseline or accept.
    recorded_by: str = UPGRADE


def _session_identity(connection: Connection) -> tuple[str | None, str | None]:
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from ._postgresql import HOLDER_TAG

        row = connection.execute(
            sa.text("SELECT current_setting('application_name'), current_user")
        ).one()
        application_name = HOLDER_TAG.sub("", row[0] or "") or None
        return application_name, row[1]
    if dialect in ("mysql", "mariadb"):
        return None, connection.execute(sa.text("SELECT CURRENT_USER()")).scalar()
    return None, None


class Ledger:
    """Reads and writes the ledger table of one database."""

    def __init__(self, table_name: str, schema: str | None, script: ScriptDirectory) -> None:
        self.table = ledger_table(table_name, schema)
        self.script = script
        self._application_name: str | None = None
        self._database_user: str | None = None

    def exists(self, connection: Connection) -> bool:
        """Tell whether the ledger table exists."""
        return bool(sa.inspect(connection).has_table(self.table.name, schema=self.table.schema))

    def prepare(self, connection: Connection, heads: Sequence[str]) -> None:
        """Create the table on first use and record a baseline for a migrated database.

        Runs in a transaction of its own, which commits before Alembic starts.
        """
        with connection.begin():
            self._application_name, self._database_user = _session_identity(connection)
            if not self.exists(connection):
                logger.info("Creating the ledger table %s", self._qualified_name())
                self.table.create(connection)
            has_rows = connection.execute(sa.select(sa.func.count()).select_from(self.table))
            if has_rows.scalar_one() == 0 and heads:
                self._record_baseline(connection, heads)

    def _qualified_name(self) -> str:
        schema = self.table.schema
        return f"{schema}.{self.table.name}" if schema else self.table.name

    def _is_known(self, revision: str) -> bool:
        try:
            return self.script.revision_map.get_revision(revision) is not None
        except (CommandError, RevisionError):
            return False

    def applied_revisions(self, heads: Sequence[str]) -> list[Any]:
        """Return the scripts at or below ``heads``, skipping heads these scripts lack."""
        known = [head for head in heads if self._is_known(head)]
        if not known:
            return []
        return list(self.script.revision_map.iterate_revisions(tuple(known), "base"))

    def _record_baseline(self, connection: Connection, heads: Sequence[str]) -> None:
        scripts = self.applied_revisions(heads)
        now = utc_now()
        logger.info(
            "Recording a baseline of %d applied revision(s) in the new ledger", len(scripts)
        )
        for script in reversed(scripts):
            connection.execute(
                self.table.insert().values(
                    **self._common_values(),
                    revision=script.revision,
                    direction=BASELINE,
                    checksum=revision_checksum(script.path),
                    started_at=now,
                    finished_at=now,
                    outcome="baseline",
                    note="applied before the ledger existed; checksum of the file at baseline",
                )
            )

    def _common_values(self) -> dict[str, Any]:
        from . import __version__

        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "application_name": self._application_name,
            "database_user": self._database_user,
            "alembic_version": alembic.__version__,
            "plugin_version": __version__,
        }

    def step_recorder(self) -> StepRecorder:
        """Return a callback that writes one row for a step Alembic just applied."""

        def record(
            connection: Connection, step: MigrationInfo, started_at: datetime, seconds: float
        ) -> None:
            if step.is_stamp:
                direction = STAMP
                revision = ", ".join(step.destination_revision_ids) or "base"
                checksum = None
            else:
                direction = UPGRADE if step.is_upgrade else DOWNGRADE
                revision = step.up_revision_id or "base"
                script = step.up_revision
                path = getattr(script, "path", None)
                checksum = revision_checksum(path) if path else None
            connection.execute(
                self.table.insert().values(
                    **self._common_values(),
                    revision=revision,
                    direction=direction,
                    checksum=checksum,
                    started_at=started_at,
                    finished_at=utc_now(),
                    duration_ms=round(seconds * 1000.0, 3),
                    outcome="applied",
                )
            )

        return record

    def checksum_drift(self, connection: Connection, heads: Sequence[str]) -> list[ChecksumDrift]:
        """Compare each applied revision's file with the checksum the ledger recorded for it."""
        with connection.begin():
            if not self.exists(connection):
                return []
            rows = connection.execute(
                sa.select(
                    self.table.c.revision,
                    self.table.c.checksum,
                    self.table.c.finished_at,
                    self.table.c.direction,
                )
                .where(self.table.c.direction.in_(CHECKSUM_SOURCES))
                .order_by(self.table.c.id)
            ).all()
        latest = {row.revision: row for row in rows if row.checksum}
        drift = []
        for script in self.applied_revisions(heads):
            row = latest.get(script.revision)
            if row is None:
                continue
            current = revision_checksum(script.path)
            if current != row.checksum:
                drift.append(
                    ChecksumDrift(
                        script.revision,
                        script.path,
                        row.finished_at,
                        row.checksum,
                        current,
                        row.direction,
                    )
                )
        return drift

    def accept(self, connection: Connection, revision: str, note: str | None) -> str:
        """Record the current file of ``revision`` as reviewed and correct; return its checksum."""
        script = (
            self.script.revision_map.get_revision(revision) if self._is_known(revision) else None
        )
        path = getattr(script, "path", None)
        if script is None or path is None:
            raise MigrationLockError(
                f"Revision {revision!r} is not in the scripts; run `alembic history` to list them"
            )
        checksum = revision_checksum(path)
        with connection.begin():
            self._application_name, self._database_user = _session_identity(connection)
            if not self.exists(connection):
                self.table.create(connection)
            now = utc_now()
            connection.execute(
                self.table.insert().values(
                    **self._common_values(),
                    revision=script.revision,
                    direction=ACCEPT,
                    checksum=checksum,
                    started_at=now,
                    finished_at=now,
                    outcome="accepted",
                    note=(note or "current file accepted after review")[:255],
                )
            )
        return checksum

    def history(self, connection: Connection) -> list[dict[str, Any]]:
        """Return every ledger row, oldest first, as dictionaries."""
        with connection.begin():
            if not self.exists(connection):
                return []
            result = connection.execute(sa.select(self.table).order_by(self.table.c.id))
            return [dict(row._mapping) for row in result]


def checksum_findings(
    connection: Connection, ledger: Ledger, heads: Sequence[str], policy: str
) -> list[Finding]:
    """Return a ``checksum-mismatch`` finding per drifted revision.

    Each is an error when ``policy`` is ``fail`` and a warning otherwise.
    """
    findings = []
    for item in ledger.checksum_drift(connection, heads):
        applied = item.applied_at.isoformat(sep=" ") + " UTC" if item.applied_at else "unknown"
        event = RECORDED_BY_WORDS.get(item.recorded_by, "applied")
        findings.append(
            Finding(
                code=CHECKSUM_MISMATCH,
                severity=ERROR if policy == "fail" else WARNING,
                message=(
                    f"Revision {item.revision} ({item.path}) changed after it was {event} at "
                    f"{applied}: the ledger recorded {item.recorded_checksum}, the file is now "
                    f"{item.current_checksum}."
                ),
                fix=(
                    "restore the applied version of the file, or review the change and run "
                    f"`alembic-sgp-lock accept-checksum {item.revision}`"
                ),
                revisions=(item.revision,),
                objects=(item.path,),
            )
        )
    return findings
