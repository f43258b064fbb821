"""Retention: old request-log rows and old rollups are deleted in small batches, by `cli.py prune` and by the
server itself; /v1/usage keeps answering from the rollups after the raw rows are gone, and says from when."""

import time

from test_usage_rollups import random_rows, write_as_the_server_does

from conftest import key_id, make_key, query, run_cli
from ledger.retention import PRUNE_BATCH

DAY_MS = 86400 * 1000


def aged_history(database_url: str) -> tuple[str, int]:
    """A key with requests 500, 40 and 1 day(s) old (more of the 40-day-old than one batch): its key, and now."""
    key = make_key(database_url)
    own_id = key_id(database_url, key)
    now_ms = time.time_ns() // 1_000_000
    query(database_url, "UPDATE api_keys SET created_at_ms = :at WHERE id = :id", at=now_ms - 600 * DAY_MS, id=own_id)
    rows = []
    for age_days, count in ((500, 300), (40, PRUNE_BATCH * 2 + 500), (1, 200)):
        for index, row in enumerate(random_rows([own_id], count, now_ms, seed=age_days)):
            row["created_at_ms"] = now_ms - age_days * DAY_MS - index * 1000  # within an hour past its age
            row["endpoint"] = "/v1/classify"
            rows.append(row)
    write_as_the_server_does(database_url, rows)
    return key, now_ms


def count_log(database_url: str, older_than_ms: int) -> int:
    return query(database_url, "SELECT count(*) AS n FROM request_log WHERE created_at_ms < :t", t=older_than_ms)[0]["n"]


def test_prune_deletes_what_passed_retention_and_usage_still_answers(database_url, start_server):
    key, now_ms = aged_history(database_url)
    before = count_log(database_url, now_ms)
    done = run_cli(database_url, "prune")
    assert done.returncode == 0, done.stderr
    assert f"Deleted {300 + PRUNE_BATCH * 2 + 500} request-log rows older than 30 days" in done.stdout
    assert count_log(database_url, now_ms - 30 * DAY_MS) == 0
    assert count_log(database_url, now_ms) == before - 300 - PRUNE_BATCH * 2 - 500 == 200
    cutoff_ms = (now_ms - 400 * DAY_MS) // DAY_MS * DAY_MS  # the midnight at or before 400 days ago
    assert query(database_url, "SELECT count(*) AS n FROM usage_rollups WHERE start_ms < :t", t=cutoff_ms)[0]["n"] == 0
    assert query(database_url, "SELECT count(*) AS n FROM usage_rollups")[0]["n"] > 0
    again = run_cli(database_url, "prune")
    assert "Deleted 0 request-log rows" in again.stdout and "and 0 usage rollups" in again.stdout

    running = start_server({"DATABASE_URL": database_url})
    with running.client(key) as client:
        # The 40-day-old requests' raw rows are gone; their rollups answer for them.
        forty_days = client.get("/v1/usage", params={"start_time": now_ms // 1000 - 41 * 86400,
                                                     "end_time": now_ms // 1000 - 39 * 86400}).json()
        since_ever = client.get("/v1/usage", params={"start_time": now_ms // 1000 - 600 * 86400}).json()
    assert forty_days["total_requests"] == PRUNE_BATCH * 2 + 500
    assert since_ever["total_requests"] == PRUNE_BATCH * 2 + 500 + 200  # not the 500-day-old ones ...
    assert since_ever["covered_from"] == cutoff_ms // 1000  # ... and it says so


def test_the_server_prunes_by_itself(database_url, start_server):
    key, now_ms = aged_history(database_url)
    running = start_server({"DATABASE_URL": database_url, "REQUEST_LOG_RETENTION_DAYS": "7"})
    deadline = time.monotonic() + 60
    while "retention: deleted" not in running.log() and time.monotonic() < deadline:  # logged once it is done
        time.sleep(0.2)
    assert count_log(database_url, now_ms - 7 * DAY_MS) == 0
    assert count_log(database_url, now_ms) == 200
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": "nope"}).status_code == 400
    assert "retention: deleted 2800 request-log rows" in running.log()
