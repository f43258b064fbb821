"""Usage rollups (per key, minute, hour and day) filled from the log, and the request log's `images`.

The counters /v1/usage reads instead of the request log.

The backfill reads the log in slices of BACKFILL_BATCH ids, each summed by the database in one
INSERT ... SELECT ... GROUP BY per rollup width (no rows come to Python), so each statement is short and its
memory bounded whatever the log's size. Rows logged before this revision carry no image count: they add none.

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

# Frozen here as rollups.py has them when this revision was written: the histogram's bounds must not move.
WIDTHS_S = (60, 3600, 86400)
LATENCY_BUCKETS = 32
LATENCY_EDGES_MS = tuple(2 ** (k / 2) for k in range(LATENCY_BUCKETS - 1))
HISTOGRAM = tuple(f"h{index:02d}" for index in range(LATENCY_BUCKETS))
COUNTS = ("requests", "images", "succeeded", "client_errors", "rate_limited", "server_errors", "latency_ms_sum",
          *HISTOGRAM)
KEY = ("key_id", "width_s", "start_ms", "endpoint", "model_version")
BACKFILL_BATCH = 50_000


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
    backfill(op.get_bind())
    # Last: on PostgreSQL adding a column locks the log against every reader and writer until this commits, so
    # not for the whole backfill. Nullable, with no default: it rewrites no rows on either database.
    op.add_column("request_log", sa.Column("images", sa.Integer(), nullable=True))


def backfill(connection: sa.Connection) -> None:
    low, high = connection.execute(sa.text("SELECT min(id), max(id) FROM request_log")).one()
    if low is None:
        return
    for first in range(low, high + 1, BACKFILL_BATCH):
        for width_s in WIDTHS_S:
            connection.execute(sa.text(rollup_sql(width_s)), {"first": first, "last": first + BACKFILL_BATCH})


def rollup_sql(width_s: int) -> str:
    """The rollups of the log rows with ids in [:first, :last), added to those already there."""
    width_ms = width_s * 1000
    bounds = (None, *LATENCY_EDGES_MS, None)
    histogram = [
        "SUM(CASE WHEN " + " AND ".join([*([f"latency_ms >= {low!r}"] if low is not None else []),
                                         *([f"latency_ms < {high!r}"] if high is not None else [])]) + " THEN 1 ELSE 0 END)"
        for low, high in zip(bounds, bounds[1:])]
    counts = ["COUNT(*)", "0", "SUM(CASE WHEN status_code = 200 THEN 1 ELSE 0 END)",
              "SUM(CASE WHEN status_code >= 400 AND status_code < 500 AND status_code <> 429 THEN 1 ELSE 0 END)",
              "SUM(CASE WHEN status_code = 429 THEN 1 ELSE 0 END)",
              "SUM(CASE WHEN status_code >= 500 THEN 1 ELSE 0 END)", "SUM(latency_ms)", *histogram]
    updates = ", ".join(f"{name} = usage_rollups.{name} + excluded.{name}" for name in COUNTS)
    return (f"INSERT INTO usage_rollups ({', '.join((*KEY, *COUNTS))}) "
            f"SELECT key_id, {width_s}, created_at_ms / {width_ms} * {width_ms}, endpoint, COALESCE(model_version, ''), "
            f"{', '.join(counts)} FROM request_log "
            "WHERE key_id IS NOT NULL AND NOT replayed AND endpoint IN ('/v1/classify', '/v1/embeddings') "
            "AND id >= :first AND id < :last GROUP BY 1, 3, 4, 5 "
            f"ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET {updates}")


def downgrade() -> None:
    op.drop_index("ix_usage_rollups_end", table_name="usage_rollups")
    op.drop_table("usage_rollups")
    with op.batch_alter_table("request_log") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("images")
