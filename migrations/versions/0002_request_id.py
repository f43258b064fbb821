"""The request log's `request_id`: the X-Request-ID each request was answered with.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, with no default: adding it rewrites no rows on either database; older rows have none.
    op.add_column("request_log", sa.Column("request_id", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_log") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("request_id")
