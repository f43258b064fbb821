"""Counting the request log that was there before the usage rollups (revision 0006) into them, while serving.

Revision 0006 leaves a `rollup_backfill` row per key that had logged requests (db.RollupBackfill): its rows up
to `last_id` and before `frontier_ms` are not counted yet. Each job of the database thread counts one batch of
one key, newest first: at most BATCH_ROWS of its rows nearest the frontier, read through the log's index on
(key_id, created_at_ms) and counted exactly as new rows are (Transaction.count_as_inserted, rollups.add_rows),
while the frontier moves down to the batch's oldest in the same transaction. So a batch is counted once,
whichever server runs it and wherever one stops; the key's usage is exact from its frontier on, and /v1/usage
says so (`covered_from`). The key with the latest frontier goes next, so every key's recent days are counted
before anyone's older ones; rows past USAGE_RETENTION_DAYS are not counted at all. On PostgreSQL each host
takes a key no other host is on.

A batch is a job of the group's transaction (as retention's are): on SQLite it takes no write lock the request
path would queue behind, and its rollups are upserted with the group's own, in one order. While any key is
left, retention deletes no log rows (retention.py): a row deleted before it is counted would be lost to usage.
"""

import asyncio
import logging
from functools import partial
from typing import Literal

from sqlalchemy import bindparam, delete, or_, select, update

from db import RequestLog, RollupBackfill
from ledger.retention import retention_cutoff_s
from ledger.rollups import COUNTED_ENDPOINTS
from ledger.writer import LAST_IN_GROUP, DatabaseWriter, Transaction

logger = logging.getLogger("classify")

BATCH_ROWS = 2000  # about 10 ms of the database thread here
PAUSE_S = 0.05  # between batches, so requests' groups go first
BUSY_RETRY_S = 5  # PostgreSQL: every key left is being counted by another host
FAILED_RETRY_S = 60

_PENDING = select(RollupBackfill.key_id, RollupBackfill.frontier_ms, RollupBackfill.oldest_ms,
                  RollupBackfill.last_id).order_by(RollupBackfill.frontier_ms.desc(), RollupBackfill.key_id).limit(1)
NEXT_KEY = {"sqlite": _PENDING, "postgresql": _PENDING.with_for_update(skip_locked=True)}
ANY_KEY_LEFT = select(RollupBackfill.key_id).limit(1)
# The created_at of the key's row `batch_rows` rows before the frontier (of any endpoint: a batch counts at most
# that many); none when fewer are left.
BATCH_START = (select(RequestLog.created_at_ms)
               .where(RequestLog.key_id == bindparam("key"), RequestLog.created_at_ms < bindparam("frontier_ms"))
               .order_by(RequestLog.created_at_ms.desc()).offset(bindparam("batch_rows")).limit(1))
UNCOUNTED = select(RequestLog.key_id, RequestLog.endpoint, RequestLog.status_code, RequestLog.latency_ms,
                   RequestLog.created_at_ms, RequestLog.model_version, RequestLog.images, RequestLog.replayed).where(
    RequestLog.key_id == bindparam("key"), RequestLog.created_at_ms >= bindparam("start_ms"),
    RequestLog.created_at_ms < bindparam("frontier_ms"), RequestLog.id <= bindparam("last_id"),
    # or_, not in_: the database thread binds parameters by name, and in_'s list is expanded when it runs
    ~RequestLog.replayed, or_(*(RequestLog.endpoint == endpoint for endpoint in COUNTED_ENDPOINTS)))
MOVE_FRONTIER = update(RollupBackfill).where(RollupBackfill.key_id == bindparam("key")).values(
    frontier_ms=bindparam("start_ms"))
KEY_DONE = delete(RollupBackfill).where(RollupBackfill.key_id == bindparam("key"))

Progress = Literal["counted", "busy", "done"]


def count_a_batch(transaction: Transaction, kept_from_ms: int, batch_rows: int = BATCH_ROWS) -> Progress:
    """Counts the next batch of the key with the latest frontier, none of it before `kept_from_ms` (the usage
    retention's cutoff); "busy" when every key left is another host's just now."""
    pending = transaction.one(NEXT_KEY[transaction.dialect.name])
    if pending is None:
        return "busy" if transaction.scalar(ANY_KEY_LEFT) is not None else "done"
    key, frontier_ms, oldest_ms, last_id = pending
    floor_ms = max(oldest_ms, kept_from_ms)
    batch_start_ms = transaction.scalar(BATCH_START, key=key, frontier_ms=frontier_ms, batch_rows=batch_rows)
    is_last = batch_start_ms is None or batch_start_ms <= floor_ms
    start_ms = floor_ms if is_last else batch_start_ms
    # The frontier first: the rows are counted only at the commit that moves it (Transaction.finish).
    if is_last:
        transaction.execute(KEY_DONE, key=key)
    else:
        transaction.execute(MOVE_FRONTIER, key=key, start_ms=start_ms)
    cursor = transaction.execute(UNCOUNTED, key=key, start_ms=start_ms, frontier_ms=frontier_ms, last_id=last_id)
    names = [column[0] for column in cursor.description]
    transaction.count_as_inserted(RequestLog, [dict(zip(names, row)) for row in cursor.fetchall()])
    return "counted"


async def backfill(writer: DatabaseWriter, usage_retention_days: int, batch_rows: int = BATCH_ROWS,
                   pause_s: float = PAUSE_S) -> int:
    """Counts batch after batch until no key is left; how many batches this process counted."""
    batches = 0
    while True:
        kept_from_ms = retention_cutoff_s(usage_retention_days) * 1000
        job = partial(count_a_batch, kept_from_ms=kept_from_ms, batch_rows=batch_rows)
        try:
            progress = await writer.run(job, order=LAST_IN_GROUP)
        except Exception as exc:  # a busy or unreachable database: later
            logger.warning("usage backfill: a batch failed, retrying in %d s: %s", FAILED_RETRY_S, exc)
            await asyncio.sleep(FAILED_RETRY_S)
            continue
        if progress == "done":
            return batches
        batches += progress == "counted"
        await asyncio.sleep(pause_s if progress == "counted" else BUSY_RETRY_S)


async def backfill_in_background(writer: DatabaseWriter, usage_retention_days: int) -> None:
    """The server's background task: the backfill, if there is one left, then nothing more."""
    batches = await backfill(writer, usage_retention_days)
    if batches:
        logger.info("usage backfill: the log from before the rollups is counted (%d batches here)", batches)
