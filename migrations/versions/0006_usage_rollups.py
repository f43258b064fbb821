"""Usage rollups (per key, minute, hour and day), the backfill's progress, and the request log's `images`.

The counters /v1/usage reads instead of the request log. The log already there is counted into them after
this revision, by the servers, a small batch per transaction (ledger/backfill.py), not here: a migration runs
in one transaction, which on SQLite holds the write lock throughout (counting a million rows in it took 8 s
here). Here each key with logged requests gets a `rollup_backfill` row saying what is left: found through
the log's index on (key_id, created_at_ms), so this revision takes milliseconds whatever the log's size.
Rows logged before it carry no image count: they add none.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LATENCY_BUCKETS = 32
COUNTS = ("requests", "images", "succeeded", "client_errors", "rate_limited", "server_errors", "latency_ms_sum",
          *(f"h{index:02d}" for index in range(LATENCY_BUCKETS)))
KEY = ("key_id", "width_s", "start_ms", "endpoint", "model_version")
MINUTE_MS = 60_000


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("width_s", sa.Integer(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        *[sa.Column(name, sa.Double() if name == "latency_ms_sum" else sa.Integer(), nullable=False)
          for name in COUNTS],
        sa.PrimaryKeyConstraint(*KEY),
        sqlite_with_rowid=False,  # a key's range read in one sweep of the primary key
    )
    op.create_index("ix_usage_rollups_end", "usage_rollups", [sa.text("(start_ms + width_s * 1000)")])
    op.create_table(
        "rollup_backfill",
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), primary_key=True, autoincrement=False),
        sa.Column("frontier_ms", sa.BigInteger(), nullable=False),
        sa.Column("oldest_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
    )
    # Each key's newest and oldest logged request, two reads of the index each; the frontier starts at the minute
    # after the newest, and every row up to the log's last id is left to count.
    op.execute(f"""
        INSERT INTO rollup_backfill (key_id, frontier_ms, oldest_ms, last_id)
        SELECT id, (newest / {MINUTE_MS} + 1) * {MINUTE_MS}, oldest, (SELECT max(id) FROM request_log)
        FROM (SELECT id,
                     (SELECT max(request_log.created_at_ms) FROM request_log WHERE request_log.key_id = api_keys.id)
                     AS newest,
                     (SELECT min(request_log.created_at_ms) FROM request_log WHERE request_log.key_id = api_keys.id)
                     AS oldest
              FROM api_keys) AS logged
        WHERE newest IS NOT NULL""")
    # Nullable, with no default: it rewrites no rows on either database.
    op.add_column("request_log", sa.Column("images", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_table("rollup_backfill")
    op.drop_index("ix_usage_rollups_end", table_name="usage_rollups")
    op.drop_table("usage_rollups")
    with op.batch_alter_table("request_log") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("images")
