"""create invoice

Revision ID: 2b1d8f3c0e12
Revises: 1a0c7e2b9d01
Create Date: 2026-12-04 21:31:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "2b1d8f3c0e12"
down_revision: str | Sequence[str] | None = "1a0c7e2b9d01"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "invoice",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("customer_id", sa.Integer, sa.ForeignKey("customer.id"), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
    )
    op.create_index("ix_invoice_customer_id", "invoice", ["customer_id"])


def downgrade() -> None:
    op.drop_index("ix_invoice_customer_id", table_name="invoice")
    op.drop_table("invoice")
