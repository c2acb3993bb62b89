"""add the first customer

Revision ID: 3c2e9a4d1f23
Revises: 2b1d8f3c0e12
Create Date: 2026-12-04 21:32:00

"""

from collections.abc import Sequence

from alembic import op

revision: str = "3c2e9a4d1f23"
down_revision: str | Sequence[str] | None = "2b1d8f3c0e12"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The unique name makes a second insert fail loudly instead of duplicating the row.
    op.execute("INSERT INTO customer (id, name) VALUES (1, 'first customer')")


def downgrade() -> None:
    op.execute("DELETE FROM customer WHERE id = 1")
