"""Retention: request-log rows older than REQUEST_LOG_RETENTION_DAYS and usage rollups older than
USAGE_RETENTION_DAYS are deleted, PRUNE_BATCH rows per transaction.

Each batch is a job of the database thread (ledger/writer.py), so on SQLite it takes no write lock of its own
that the request path would queue behind: it shares one group's transaction, adding the time of one small
DELETE to that group, and the thread pauses PRUNE_PAUSE_S before the next. The server prunes at start-up and
every PRUNE_INTERVAL_S; `cli.py prune` does the same once, for cron.

The log's batch is the PRUNE_BATCH oldest ids (the primary key, so no index on time is needed and a log with
nothing to delete costs one short read): ids grow with time, so those are the oldest rows. None is deleted
while the log from before the rollups is still being counted into them (ledger/backfill.py).
"""

import asyncio
import logging
import time

from sqlalchemy import bindparam, delete, exists, func, literal_column, select, tuple_

from db import RequestLog, RollupBackfill, UsageRollup
from ledger.writer import DatabaseWriter, Transaction
from settings import Settings

logger = logging.getLogger("classify")

DAY = 86400

PRUNE_BATCH = 1000
PRUNE_PAUSE_S = 0.05
PRUNE_INTERVAL_S = 600

# The PRUNE_BATCH oldest rows, of which those logged before the cutoff (a row may be a little out of order).
_OLDEST = select(RequestLog.id).order_by(RequestLog.id).limit(PRUNE_BATCH).subquery()
OLDEST_IDS = select(func.max(_OLDEST.c.id)).scalar_subquery()
# None while rows from before the rollups are still being counted into them (ledger/backfill.py).
OLD_LOG_ROWS = delete(RequestLog).where(RequestLog.id <= OLDEST_IDS, RequestLog.created_at_ms < bindparam("cutoff_ms"),
                                        ~exists(select(RollupBackfill.key_id)))
# Rollups that end by the cutoff, oldest first: the index on that expression finds them.
ROLLUP_KEY = tuple_(UsageRollup.key_id, UsageRollup.width_s, UsageRollup.start_ms, UsageRollup.endpoint,
                    UsageRollup.model_version)
ROLLUP_END = UsageRollup.start_ms + UsageRollup.width_s * literal_column("1000")  # as the index spells it
OLD_ROLLUPS = delete(UsageRollup).where(ROLLUP_KEY.in_(
    select(*ROLLUP_KEY.clauses).where(ROLLUP_END <= bindparam("cutoff_ms")).order_by(ROLLUP_END).limit(PRUNE_BATCH)))


def retention_cutoff_s(retention_days: int, now_s: float | None = None) -> int:
    """The UTC midnight at or before `retention_days` ago: only rollups that end by it are deleted, so every
    rollup from it on is kept (a day more than the setting at most, never less)."""
    now_s = time.time() if now_s is None else now_s
    return int(now_s - retention_days * DAY) // DAY * DAY


def delete_old_log_rows(transaction: Transaction, cutoff_ms: int) -> int:
    """Deletes up to PRUNE_BATCH of the oldest log rows logged before `cutoff_ms`; how many it deleted."""
    return transaction.execute(OLD_LOG_ROWS, cutoff_ms=cutoff_ms).rowcount


def delete_old_rollups(transaction: Transaction, cutoff_ms: int) -> int:
    """Deletes up to PRUNE_BATCH rollups that end by `cutoff_ms`; how many it deleted."""
    return transaction.execute(OLD_ROLLUPS, cutoff_ms=cutoff_ms).rowcount


async def prune(writer: DatabaseWriter, settings: Settings, pause_s: float = PRUNE_PAUSE_S) -> tuple[int, int]:
    """Deletes, batch by batch, what has passed its retention now; how many log rows and rollups it deleted."""
    log_cutoff_ms = int((time.time() - settings.request_log_retention_days * DAY) * 1000)
    rollup_cutoff_ms = retention_cutoff_s(settings.usage_retention_days) * 1000
    deleted = []
    for delete_batch, cutoff_ms in ((delete_old_log_rows, log_cutoff_ms), (delete_old_rollups, rollup_cutoff_ms)):
        total = 0
        while True:
            count = await writer.run(lambda transaction: delete_batch(transaction, cutoff_ms))
            total += count
            if count == 0:
                break
            await asyncio.sleep(pause_s)
        deleted.append(total)
    return deleted[0], deleted[1]


async def prune_forever(writer: DatabaseWriter, settings: Settings) -> None:
    """The server's background task: prunes at start-up, then every PRUNE_INTERVAL_S, until cancelled."""
    while True:
        try:
            log_rows, rollups = await prune(writer, settings)
            if log_rows or rollups:
                logger.info("retention: deleted %d request-log rows and %d usage rollups", log_rows, rollups)
        except Exception as exc:  # a busy or unreachable database: the next round tries again
            logger.warning("retention: pruning failed, retrying in %d s: %s", PRUNE_INTERVAL_S, exc)
        await asyncio.sleep(PRUNE_INTERVAL_S)
