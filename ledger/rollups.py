"""Usage rollups: each request-log row also counted in its key's minute, hour and day (db.UsageRollup), in the
same transaction as the row, so `/v1/usage` (usage.py) reads O(buckets) counters instead of O(requests) rows.

The database thread (ledger/writer.py) calls `add_rows` with each group's log rows after inserting them (and
with rows logged before the rollups existed, which ledger/backfill.py hands it a batch at a time): the
group's rows are summed here first, then one upsert per (key, width, start, endpoint, model version), in key
order, so two hosts' groups lock shared counters in the same order. Rows without a key (a missing or wrong key)
are nobody's usage, a replayed answer (idempotency.py) was counted with its first request, and only the routes
the limit charges (COUNTED_ENDPOINTS) are asked about: none of those is counted.

Latency is kept as a fixed histogram: 32 buckets whose bounds grow by a factor of sqrt(2) from 1 ms to 32.8 s.
A percentile is reported as its bucket's geometric middle, so between 1 ms and 32.8 s it is within a factor of
2^(1/4) (19 %) of the exact nearest-rank percentile; under 1 ms it is reported as 0.5 ms, from 32.8 s on as 32768.
"""

import bisect
from collections.abc import Iterable
from functools import cache
from typing import Any

from sqlalchemy import Insert

from db import LATENCY_BUCKETS, UsageRollup
from ledger.writer import Transaction, dialect_insert

# What the limit charges and /v1/usage can be asked about; other routes' rows would be counters nobody reads.
COUNTED_ENDPOINTS = ("/v1/classify", "/v1/embeddings")
WIDTHS_S = (60, 3600, 86400)  # the minute, hour and day rollups, each a multiple of the one before
LATENCY_EDGES_MS = tuple(2 ** (k / 2) for k in range(LATENCY_BUCKETS - 1))  # bucket b is [edge b-1, edge b)
HISTOGRAM = tuple(f"h{index:02d}" for index in range(LATENCY_BUCKETS))
STATUS_COUNTS = ("succeeded", "client_errors", "rate_limited", "server_errors")
COUNTS = ("requests", "images", *STATUS_COUNTS, "latency_ms_sum", *HISTOGRAM)  # summed, in rows and in reads
KEY = ("key_id", "width_s", "start_ms", "endpoint", "model_version")
# What a percentile falling in each bucket is reported as: the geometric middle (the ends: 0.5 ms, 32768 ms).
REPORTED_MS = (0.5, *(round(edge * 2 ** 0.25, 2) for edge in LATENCY_EDGES_MS[:-1]), LATENCY_EDGES_MS[-1])


def latency_bucket(latency_ms: float) -> int:
    return bisect.bisect_right(LATENCY_EDGES_MS, latency_ms)


def status_column(status_code: int) -> str | None:
    """Which of by_status's counts a status adds to (1xx and 3xx: none)."""
    if status_code == 200:
        return "succeeded"
    if status_code == 429:
        return "rate_limited"
    if 400 <= status_code < 500:
        return "client_errors"
    if status_code >= 500:
        return "server_errors"
    return None


def counted(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rollup rows that count `rows` (request-log rows as ledger/request_log.py writes them), in key order."""
    sums: dict[tuple[Any, ...], list[float]] = {}
    position = {name: index for index, name in enumerate(COUNTS)}
    for row in rows:
        if row.get("key_id") is None or row.get("replayed") or row["endpoint"] not in COUNTED_ENDPOINTS:
            continue  # nobody's; a replay, its first request's (counted once); a route usage does not count
        outcome = status_column(row["status_code"])
        for width_s in WIDTHS_S:
            width_ms = width_s * 1000
            key = (row["key_id"], width_s, row["created_at_ms"] // width_ms * width_ms, row["endpoint"],
                   row.get("model_version") or "")
            counts = sums.get(key)
            if counts is None:
                counts = sums[key] = [0] * len(COUNTS)
            counts[0] += 1
            counts[1] += row.get("images") or 0
            if outcome is not None:
                counts[position[outcome]] += 1
            counts[position["latency_ms_sum"]] += row["latency_ms"]
            counts[position[HISTOGRAM[latency_bucket(row["latency_ms"])]]] += 1
    return [{**dict(zip(KEY, key)), **dict(zip(COUNTS, counts))} for key, counts in sorted(sums.items())]


@cache
def upsert(dialect_name: str) -> Insert:
    """INSERT ... ON CONFLICT DO UPDATE adding to the counters; SQLite and PostgreSQL spell it alike."""
    statement = dialect_insert(dialect_name)(UsageRollup)
    table = UsageRollup.__table__
    return statement.on_conflict_do_update(
        index_elements=list(KEY),
        set_={name: table.c[name] + statement.excluded[name] for name in COUNTS})


def add_rows(transaction: Transaction, rows: list[dict[str, Any]]) -> None:
    """Counts the group's log rows in their rollups, in the transaction that inserted them."""
    rollups = counted(rows)
    if rollups:
        transaction.execute_many(upsert(transaction.dialect.name), rollups)
