"""Each key's count of rate-limit hits, kept beside them, so an admission does not count its window's rows.

Filled here from the hits already there (a key's rows are at most its limit, once its expired ones are
deleted by its next admission, which also takes them off the count).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_limit_counts",
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), primary_key=True, autoincrement=False),
        sa.Column("hits", sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO rate_limit_counts (key_id, hits) SELECT key_id, count(*) FROM rate_limit_hits GROUP BY key_id")


def downgrade() -> None:
    op.drop_table("rate_limit_counts")
