"""The request log's `model_version`: the version of the model that answered each request.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, with no default: adding it rewrites no rows on either database; older rows have none.
    op.add_column("request_log", sa.Column("model_version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_log") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("model_version")
