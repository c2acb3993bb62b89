"""The half-applied marker: which revision is running on a database without transactional DDL.

MySQL and MariaDB commit every DDL statement at once, so a revision that stops
halfway leaves part of its changes while the version table still names the
previous revision. Before each revision, a row in the marker table records the
revision, the holder and the start time. The row is deleted in the transaction
that writes the version table, so it survives only when the revision did not
finish. While a revision runs, each statement it sends is appended to the row
just before the statement runs. On MySQL a DDL statement first commits the
open transaction, so the row already names the DDL when it starts.

Alembic's own version table is not altered; the marker has its own table, one
row per version table, in the version table's schema.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from . import _compat
from ._log import logger

# Statements kept in the row, and characters kept of each; the count goes on.
MAX_RECORDED_STATEMENTS = 50
MAX_STATEMENT_CHARACTERS = 300
# Statements that change nothing are not recorded.
READ_ONLY_PREFIXES = ("select", "show", "describe", "desc ", "explain")
# Driver parameter styles for which the raw UPDATE in record_statement is written.
RAW_PARAMSTYLES = frozenset({"format", "pyformat"})


@dataclass(frozen=True)
class HalfAppliedMarker:
    """A revision that started on a database without transactional DDL and never finished.

    Revision lists are comma-separated, and empty for ``base``.
    """

    version_table: str
    revision: str
    direction: str
    source_revisions: str
    destination_revisions: str
    script_path: str
    holder: str
    started_at: datetime
    statement_count: int
    statements: tuple[str, ...]
    error: str | None


def marker_table(name: str, schema: str | None) -> sa.Table:
    """Return the marker table's definition."""
    # Imported here because SQLAlchemy's MySQL dialect is slow to import, and
    # only runs that read or write a marker need it.
    from sqlalchemy.dialects import mysql

    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("version_table", sa.String(255), primary_key=True),
        sa.Column("revision", sa.String(255), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("source_revisions", sa.String(1000), nullable=False),
        sa.Column("destination_revisions", sa.String(1000), nullable=False),
        sa.Column("script_path", sa.String(1000), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        # UTC, with microseconds on MySQL and MariaDB. One dialect name per
        # with_variant() call, because SQLAlchemy 1.4 accepts only one.
        sa.Column(
            "started_at",
            sa.DateTime()
            .with_variant(mysql.DATETIME(fsp=6), "mysql")
            .with_variant(mysql.DATETIME(fsp=6), "mariadb"),
        ),
        sa.Column("statement_count", sa.Integer, nullable=False),
        # One statement per line; whitespace inside a statement is collapsed.
        sa.Column("statements", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        schema=schema,
    )


def read_marker(
    connection: Connection,
    *,
    marker_table_name: str,
    version_table: str,
    version_table_schema: str | None,
) -> HalfAppliedMarker | None:
    """Return the marker left for ``version_table``, or None when there is none.

    Runs in a transaction of its own and leaves the connection outside any.
    """
    table = marker_table(marker_table_name, version_table_schema)
    with connection.begin():
        if not sa.inspect(connection).has_table(table.name, schema=table.schema):
            return None
        row = (
            connection.execute(sa.select(table).where(table.c.version_table == version_table))
            .mappings()
            .first()
        )
    if row is None:
        return None
    statements = tuple(line for line in (row["statements"] or "").split("\n") if line)
    return HalfAppliedMarker(
        version_table=row["version_table"],
        revision=row["revision"],
        direction=row["direction"],
        source_revisions=row["source_revisions"],
        destination_revisions=row["destination_revisions"],
        script_path=row["script_path"],
        holder=row["holder"],
        started_at=row["started_at"],
        statement_count=int(row["statement_count"]),
        statements=statements,
        error=row["error"],
    )


def delete_marker(connection: Connection, table: sa.Table, version_table: str) -> int:
    """Delete the marker row of ``version_table`` in the current transaction; return the count."""
    result = connection.execute(sa.delete(table).where(table.c.version_table == version_table))
    return int(result.rowcount)


def _one_line(statement: str) -> str:
    return " ".join(statement.split())[:MAX_STATEMENT_CHARACTERS]


def _commit(connection: Connection) -> None:
    transaction = connection.get_transaction()
    if transaction is not None and transaction.is_active:
        transaction.commit()


class MarkerRecorder:
    """Writes and clears the marker around each revision of one migration run."""

    def __init__(
        self,
        connection: Connection,
        *,
        marker_table_name: str,
        version_table: str,
        version_table_schema: str | None,
    ) -> None:
        self.connection = connection
        self.table = marker_table(marker_table_name, version_table_schema)
        self.version_table = version_table
        self.revision: str | None = None
        self.completed_statements = 0
        # Statements sent for the running revision, kept in memory as well,
        # because a rollback after a failure also undoes their appends to the row.
        self.statements: list[str] = []
        self._statement_running = False
        self._table_checked = False
        self._holder = f"host {socket.gethostname()} pid {os.getpid()}"
        self._raw_update: str | None = None
        if connection.dialect.paramstyle in RAW_PARAMSTYLES:
            preparer = connection.dialect.identifier_preparer
            self._raw_update = (
                f"UPDATE {preparer.format_table(self.table)} "
                "SET statement_count = statement_count + 1, "
                "statements = CASE WHEN statement_count < %s "
                "THEN CONCAT(statements, %s) ELSE statements END "
                "WHERE version_table = %s"
            )

    def wrap_steps(self, steps_function: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
        """Wrap Alembic's step function so that the marker is written before each revision."""

        def steps_with_marker(heads: Any, migration_context: Any) -> Iterator[Any]:
            for step in steps_function(heads, migration_context):
                info = step.info
                if not info.is_stamp:
                    self._begin(step, info)
                yield step

        return steps_with_marker

    def _begin(self, step: Any, info: Any) -> None:
        connection = self.connection
        if not self._table_checked:
            # CREATE TABLE commits at once on MySQL; the commit below ends the
            # transaction that SQLAlchemy began for it.
            self.table.create(connection, checkfirst=True)
            _commit(connection)
            self._table_checked = True
        holder = self._holder
        if connection.dialect.name in ("mysql", "mariadb"):
            session_id = connection.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
            holder += f" (MySQL connection id {session_id})"
        revision = ", ".join(info.up_revision_ids)
        delete_marker(connection, self.table, self.version_table)
        connection.execute(
            sa.insert(self.table).values(
                version_table=self.version_table,
                revision=revision,
                direction="upgrade" if info.is_upgrade else "downgrade",
                source_revisions=", ".join(info.source_revision_ids),
                destination_revisions=", ".join(info.destination_revision_ids),
                script_path=str(_compat.step_script_path(step) or ""),
                holder=holder,
                started_at=datetime.now(timezone.utc).replace(tzinfo=None),
                statement_count=0,
                statements="",
            )
        )
        _commit(connection)
        self.revision = revision
        self.completed_statements = 0
        self.statements = []
        logger.debug("Marked revision %s as started in %s", revision, self.table.name)

    def listen(self) -> None:
        """Start recording the statements of each revision on the connection."""
        event.listen(self.connection, "before_cursor_execute", self._before_execute)
        event.listen(self.connection, "after_cursor_execute", self._after_execute)

    def stop_listening(self) -> None:
        """Stop recording statements."""
        event.remove(self.connection, "before_cursor_execute", self._before_execute)
        event.remove(self.connection, "after_cursor_execute", self._after_execute)

    def _before_execute(
        self,
        connection: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if self.revision is None or statement.lstrip().lower().startswith(READ_ONLY_PREFIXES):
            return
        self._statement_running = True
        self.statements.append(_one_line(statement))
        if self._raw_update is None:
            return
        # A separate driver cursor, because executing through SQLAlchemy here
        # would fire this event again for the same connection.
        marker_cursor = _compat.dbapi_connection(connection).cursor()
        try:
            marker_cursor.execute(
                self._raw_update,
                (MAX_RECORDED_STATEMENTS, _one_line(statement) + "\n", self.version_table),
            )
        finally:
            marker_cursor.close()

    def _after_execute(self, *_arguments: Any) -> None:
        if self._statement_running:
            self._statement_running = False
            self.completed_statements += 1

    def on_version_apply(self, **_arguments: Any) -> None:
        """Delete the marker in the transaction that writes the version table."""
        if self.revision is None:
            return
        self.revision = None
        delete_marker(self.connection, self.table, self.version_table)

    def record_failure(self, error: BaseException) -> None:
        """Store ``error`` in the marker, or delete the marker when no statement took effect.

        Called after Alembic rolled back the revision's open transaction. A
        failure here is logged and does not hide ``error``.
        """
        revision = self.revision
        if revision is None:
            return
        self.revision = None
        # The statement that raised never reached after_cursor_execute.
        self._statement_running = False
        completed = self.completed_statements
        connection = self.connection
        summary = " ".join(f"{type(error).__name__}: {error}".split())[:1000]
        try:
            # Connection.rollback() is missing in SQLAlchemy 1.4's legacy mode.
            transaction = connection.get_transaction()
            if transaction is not None:
                transaction.rollback()
            if completed == 0:
                # Every statement the server ran for this revision failed, so
                # nothing of it was applied.
                delete_marker(connection, self.table, self.version_table)
                _commit(connection)
                logger.info(
                    "Revision %s failed before any statement took effect; marker deleted",
                    revision,
                )
                return
            connection.execute(
                sa.update(self.table)
                .where(self.table.c.version_table == self.version_table)
                .values(
                    error=summary,
                    statement_count=len(self.statements),
                    statements="".join(
                        line + "\n" for line in self.statements[:MAX_RECORDED_STATEMENTS]
                    ),
                )
            )
            _commit(connection)
        except Exception:
            logger.exception("Could not record the failure of revision %s", revision)
            return
        logger.error(
            "Revision %s failed after %d statement(s) took effect; it may be half applied "
            "and is marked in %s",
            revision,
            completed,
            self.table.name,
        )
