"""A log from before the usage rollups (revision 0006) is counted into them after the migration, by the servers,
a batch a transaction: exact at every step from each key's frontier on (which /v1/usage reports), exact in the
end, and retention deletes no row before it is counted. On SQLite and PostgreSQL."""

import asyncio
import time

import pytest
from alembic import command
from sqlalchemy import insert
from test_usage_rollups import random_rows

from conftest import query, run_cli, sync_engine
from db import ApiKey, RequestLog, alembic_config
from ledger.backfill import backfill, count_a_batch
from ledger.keys import hash_key
from ledger.rollups import COUNTS, KEY, add_rows, counted
from ledger.writer import DatabaseWriter

DAY_MS = 86400 * 1000
KEYS = {id: f"sk-{id}" + "k" * 42 for id in (1, 2)}


def log_from_before_the_rollups(database_url: str, rows: list[dict]) -> None:
    """A database at revision 0005 with keys 1 and 2 (KEYS) and `rows` logged (no image counts then), then
    migrated."""
    for index, row in enumerate(rows):
        row.pop("images")
        row["id"] = 1 + index * 47  # ids with gaps, as a log that was pruned
    engine = sync_engine(database_url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0005")
            for id in (1, 2):
                connection.execute(insert(ApiKey).values(id=id, key_hash=hash_key(KEYS[id]), prefix=KEYS[id][:11],
                                                         email="a@b", rate_limit=1000, window_s=60, created_at_ms=0))
            for first in range(0, len(rows), 5000):
                connection.execute(insert(RequestLog.__table__).values(rows[first:first + 5000]))
            if connection.dialect.name == "postgresql":  # ids given, so the sequence is moved past them by hand
                connection.exec_driver_sql("SELECT setval(pg_get_serial_sequence('request_log', 'id'), "
                                           "(SELECT max(id) FROM request_log))")
    finally:
        engine.dispose()
    done = run_cli(database_url, "migrate")
    assert done.returncode == 0, done.stderr


def rollups_in_db(database_url: str, where: str = "1 = 1", **params: object) -> list[dict]:
    return query(database_url, f"SELECT * FROM usage_rollups WHERE {where} ORDER BY {', '.join(KEY)}", **params)


def assert_same_rollups(found: list[dict], expected: list[dict]) -> None:
    assert [{name: row[name] for name in (*KEY, *COUNTS) if name != "latency_ms_sum"} for row in found] == \
        [{name: row[name] for name in (*KEY, *COUNTS) if name != "latency_ms_sum"} for row in expected]
    assert [row["latency_ms_sum"] for row in found] == pytest.approx([row["latency_ms_sum"] for row in expected])


def frontiers(database_url: str) -> dict[int, int]:
    return {row["key_id"]: row["frontier_ms"] for row in query(database_url, "SELECT * FROM rollup_backfill")}


def test_the_log_is_counted_batch_by_batch_and_exact_from_each_frontier_on(database_url):
    rows = random_rows([1, 2, None], 3000, 1_800_000_000_000, seed=5, replayed_share=0.05)
    log_from_before_the_rollups(database_url, rows)
    # The migration counted nothing itself: it left each logged key's whole log to count, from after its newest.
    assert rollups_in_db(database_url) == []
    for key_id, frontier_ms in frontiers(database_url).items():
        newest_ms = max(row["created_at_ms"] for row in rows if row["key_id"] == key_id)
        assert frontier_ms == (newest_ms // 60_000 + 1) * 60_000

    newest_ms = max(row["created_at_ms"] for row in rows)
    # Logged by the new server after the migration, counted as they are written: beside the oldest row and in
    # the newest minute (where the backfill also counts), so only `last_id` keeps them from being counted twice.
    live_rows = random_rows([1, 2], 200, newest_ms, seed=6)
    for index, row in enumerate(live_rows):
        row["created_at_ms"] = newest_ms - index % 2 * (newest_ms - min(r["created_at_ms"] for r in rows))

    async def count_batch_by_batch() -> int:
        writer = DatabaseWriter(database_url, 10, {RequestLog: add_rows})
        writer.start()
        batches = 0
        try:
            for _ in range(5):
                assert await writer.run(lambda transaction: count_a_batch(transaction, 0, batch_rows=150)) == "counted"
                batches += 1
                for key_id, frontier_ms in frontiers(database_url).items():  # exact from the frontier on
                    for width_s in (60, 3600):
                        width_ms = width_s * 1000
                        covered_ms = -(-frontier_ms // width_ms) * width_ms  # as /v1/usage rounds it
                        assert_same_rollups(
                            rollups_in_db(database_url, "key_id = :key AND width_s = :width AND start_ms >= :start",
                                          key=key_id, width=width_s, start=covered_ms),
                            [rollup for rollup in counted([row for row in rows if row["created_at_ms"] >= covered_ms])
                             if rollup["key_id"] == key_id and rollup["width_s"] == width_s])
            await asyncio.gather(*[writer.insert(RequestLog, row) for row in live_rows])
        finally:
            await writer.stop()
        # Then two servers' worth at once, each with its own connection, to the end.
        writers = [DatabaseWriter(database_url, 10, {RequestLog: add_rows}) for _ in range(2)]
        for writer in writers:
            writer.start()
        try:
            batches += sum(await asyncio.gather(*[backfill(writer, 400, batch_rows=150, pause_s=0)
                                                  for writer in writers]))
        finally:
            for writer in writers:
                await writer.stop()
        return batches

    assert asyncio.run(count_batch_by_batch()) > 10
    assert frontiers(database_url) == {}
    assert_same_rollups(rollups_in_db(database_url), counted(rows + live_rows))


def test_a_server_counts_the_log_while_its_usage_stays_exact_from_covered_from_on(database_url, start_server):
    now_ms = time.time_ns() // 1_000_000
    rows = random_rows([1], 40_000, now_ms, seed=7, replayed_share=0.05)  # 20 of the server's batches
    log_from_before_the_rollups(database_url, rows)
    oldest_ms = min(row["created_at_ms"] for row in rows)
    running = start_server({"DATABASE_URL": database_url})
    answers = []
    with running.client(KEYS[1]) as client:
        while True:
            answer = client.get("/v1/usage").json()
            answers.append(answer)
            if answer["covered_from"] * 1000 <= oldest_ms:  # all counted
                break
            assert len(answers) < 2000, "the backfill did not finish"
            time.sleep(0.02)
    for answer in answers:  # each from one snapshot: exactly the rows logged from covered_from on
        counted_rows = [row for row in rows if row["endpoint"] == "/v1/classify" and not row["replayed"]
                        and row["created_at_ms"] >= answer["covered_from"] * 1000]
        assert answer["total_requests"] == len(counted_rows)
        assert answer["successful_requests"] == sum(row["status_code"] == 200 for row in counted_rows)
    assert len({answer["covered_from"] for answer in answers}) > 2  # seen part way, more than once
    assert "usage backfill: the log from before the rollups is counted" in running.log()


def test_retention_deletes_no_log_row_before_it_is_counted(database_url):
    now_ms = time.time_ns() // 1_000_000
    past_log_retention = random_rows([1], 500, now_ms - 40 * DAY_MS, seed=9)
    past_usage_retention = random_rows([1], 100, now_ms - 500 * DAY_MS, seed=10)  # counted by no rollup
    log_from_before_the_rollups(database_url, past_log_retention + past_usage_retention)
    done = run_cli(database_url, "prune")
    assert "Deleted 0 request-log rows" in done.stdout and "Log rows are kept while" in done.stdout, done.stdout
    assert query(database_url, "SELECT count(*) AS n FROM request_log")[0]["n"] == 600

    async def count_all() -> int:
        writer = DatabaseWriter(database_url, 10, {RequestLog: add_rows})
        writer.start()
        try:
            return await backfill(writer, 400, pause_s=0)
        finally:
            await writer.stop()

    assert asyncio.run(count_all()) == 1
    assert_same_rollups(rollups_in_db(database_url), counted(past_log_retention))
    done = run_cli(database_url, "prune")
    assert "Deleted 600 request-log rows" in done.stdout and "Log rows are kept" not in done.stdout, done.stdout
    assert_same_rollups(rollups_in_db(database_url), counted(past_log_retention))
