"""Reading the revisions recorded in the version table."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def read_heads(
    connection: Connection, version_table: str, version_table_schema: str | None
) -> tuple[str, ...]:
    """Return the revisions in the version table, empty when it is missing.

    The read runs in a transaction of its own that ends before this returns,
    so the connection is left outside any transaction.
    """
    with connection.begin():
        if not sa.inspect(connection).has_table(version_table, schema=version_table_schema):
            return ()
        table = sa.table(version_table, sa.column("version_num"), schema=version_table_schema)
        rows = connection.execute(sa.select(table.c.version_num)).scalars().all()
    return tuple(rows)


def format_heads(heads: Sequence[str]) -> str:
    """Return the heads as Alembic prints them, or ``base`` when there are none."""
    return ", ".join(heads) if heads else "base (empty version table)"
