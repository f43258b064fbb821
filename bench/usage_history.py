"""Benchmark: GET /v1/usage for a key with a long history, at several history sizes, on SQLite and PostgreSQL.

    $ .venv/bin/python bench/usage_history.py                        # 10,000 and 10,000,000 requests
    $ .venv/bin/python bench/usage_history.py --rows 10000 --rows 1000000 --databases sqlite

For each size, one key's history is seeded over the last 90 days, one UTC day at a time: the request-log rows
(timestamps uniform over the day, today's up to now, 90 % answered 200, 4 % 429, the rest 4xx and 5xx; log-normal latencies around
60 ms; one image each), bulk-inserted (SQLite: executemany in one transaction; PostgreSQL: COPY), and the minute,
hour and day rollups the database thread would have written for them, summed with numpy by the same rules
(ledger/rollups.py: its bounds, its status classes) and inserted alike. Then the server starts on that database
(server_load.start, as `make run` does) and one client asks each query --requests times in a row, after a few
warm-up calls (REQUEST_LOG_RETENTION_DAYS above the history's 90 days, so nothing is pruned meanwhile):
p50 and p99 of the time to the whole answer, as httpx measures it. Also the bytes on disk per
log row and per rollup row (SQLite's dbstat, PostgreSQL's pg_total_relation_size). Prints a table and writes
bench/results/usage_history.json.

Then classify while the server prunes a backlog (--pruning-rows, 10,000,000 by default, on SQLite): the same
history, the server started once with retention above it (nothing to prune) and once with
REQUEST_LOG_RETENTION_DAYS=30 (two thirds of the rows past it: the server deletes them from its start, 1,000 a
transaction), each loaded by wrk with 8 connections posting the 451x300 photo for --seconds: p50, p99 and the
answers' statuses, and how many rows were deleted meanwhile.

Then an upgrade with a log (--upgrade-rows, 1,000,000 by default, on SQLite): the same history taken back to
revision 0005 (no rollups), then `cli.py migrate` timed, then the server started on it and loaded by wrk as
above while it counts the old log into the rollups (ledger/backfill.py), and again once it has: how long the
migration and the counting took, and classify's figures during and after.
"""

import argparse
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from alembic import command  # noqa: E402

import server_load  # noqa: E402
from conftest import query, sync_engine  # noqa: E402
from db import alembic_config  # noqa: E402
from ledger.rollups import COUNTS, HISTOGRAM, KEY, LATENCY_EDGES_MS, WIDTHS_S  # noqa: E402
from servers import PostgresServer  # noqa: E402

DAYS = 90
DAY_MS = 86400 * 1000
LOG_COLUMNS = ("key_id", "endpoint", "method", "status_code", "latency_ms", "created_at_ms", "model_version", "images")
STATUSES = np.array([200, 429, 400, 422, 503, 500])
STATUS_CHANCES = np.array([0.90, 0.04, 0.03, 0.01, 0.01, 0.01])


def day_of_history(chance: np.random.Generator, day_start_ms: int, count: int, now_ms: int) -> dict[str, np.ndarray]:
    return {"created_at_ms": np.sort(day_start_ms + chance.integers(0, min(DAY_MS, now_ms - day_start_ms), count)),
            "status_code": chance.choice(STATUSES, count, p=STATUS_CHANCES),
            "latency_ms": chance.lognormal(np.log(60), 0.6, count)}


def rollups_of(day: dict[str, np.ndarray], key_id: int, width_s: int) -> list[tuple]:
    """What rollups.counted gives for these rows (one endpoint, one model version, one image each), with numpy."""
    width_ms = width_s * 1000
    starts, slot = np.unique(day["created_at_ms"] // width_ms * width_ms, return_inverse=True)
    status = day["status_code"]
    columns = {"requests": np.bincount(slot), "images": np.bincount(slot),
               "succeeded": np.bincount(slot, status == 200),
               "client_errors": np.bincount(slot, (status >= 400) & (status < 500) & (status != 429)),
               "rate_limited": np.bincount(slot, status == 429), "server_errors": np.bincount(slot, status >= 500),
               "latency_ms_sum": np.bincount(slot, day["latency_ms"])}
    bucket = np.searchsorted(np.array(LATENCY_EDGES_MS), day["latency_ms"], side="right")
    histogram = np.bincount(slot * len(HISTOGRAM) + bucket, minlength=len(starts) * len(HISTOGRAM)).reshape(-1, len(HISTOGRAM))
    for index, name in enumerate(HISTOGRAM):
        columns[name] = histogram[:, index]
    return [(key_id, width_s, int(start), "/v1/classify", "bench", *(
        float(columns[name][row]) if name == "latency_ms_sum" else int(columns[name][row]) for name in COUNTS))
        for row, start in enumerate(starts)]


def log_rows_of(day: dict[str, np.ndarray], key_id: int) -> list[tuple]:
    return [(key_id, "/v1/classify", "POST", status, latency, created, "bench", 1) for status, latency, created in
            zip(day["status_code"].tolist(), day["latency_ms"].tolist(), day["created_at_ms"].tolist())]


def seed(database_url: str, key_id: int, rows: int, now_ms: int) -> float:
    """One key's `rows` requests over the last DAYS days, and their rollups; the seconds it took."""
    started = time.monotonic()
    chance = np.random.default_rng(90)
    first_day_ms = (now_ms // DAY_MS - DAYS + 1) * DAY_MS  # the last day is today, up to now
    per_day = np.bincount(chance.integers(0, DAYS, rows), minlength=DAYS)
    rollup_columns = (*KEY, *COUNTS)
    if database_url.startswith("sqlite"):
        connection = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        connection.execute("BEGIN")
        for index, count in enumerate(per_day):
            day = day_of_history(chance, first_day_ms + index * DAY_MS, int(count), now_ms)
            connection.executemany(f"INSERT INTO request_log ({', '.join(LOG_COLUMNS)}) VALUES "
                                   f"({', '.join('?' * len(LOG_COLUMNS))})", log_rows_of(day, key_id))
            for width_s in WIDTHS_S:
                connection.executemany(f"INSERT INTO usage_rollups ({', '.join(rollup_columns)}) VALUES "
                                       f"({', '.join('?' * len(rollup_columns))})", rollups_of(day, key_id, width_s))
        connection.execute("COMMIT")
        connection.close()
        return time.monotonic() - started
    engine = sync_engine(database_url)
    with engine.begin() as connection:
        cursor = connection.connection.driver_connection.cursor()
        for index, count in enumerate(per_day):
            day = day_of_history(chance, first_day_ms + index * DAY_MS, int(count), now_ms)
            copy_rows(cursor, "request_log", LOG_COLUMNS, log_rows_of(day, key_id))
            for width_s in WIDTHS_S:
                copy_rows(cursor, "usage_rollups", rollup_columns, rollups_of(day, key_id, width_s))
    engine.dispose()
    # VACUUM too, so that autovacuum does not sweep the new rows while the server is measured.
    with sync_engine(database_url).execution_options(isolation_level="AUTOCOMMIT").connect() as connection:
        connection.exec_driver_sql("VACUUM ANALYZE")
    return time.monotonic() - started


def copy_rows(cursor: object, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    text = io.StringIO()
    for row in rows:
        text.write("\t".join(map(str, row)) + "\n")
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
        copy.write(text.getvalue())


def bytes_per_row(database_url: str, table: str) -> float:
    count = query(database_url, f"SELECT count(*) AS n FROM {table}")[0]["n"]
    if database_url.startswith("sqlite"):
        size = query(database_url, "SELECT sum(pgsize) AS b FROM dbstat WHERE name IN "
                     "(SELECT name FROM sqlite_master WHERE tbl_name = :t)",
                     t=table)[0]["b"]
    else:
        size = query(database_url, f"SELECT pg_total_relation_size('{table}') AS b")[0]["b"]
    return size / count if count else 0.0


def timed(client: httpx.Client, params: dict, repeats: int) -> dict[str, float]:
    for _ in range(5):
        client.get("/v1/usage", params=params).raise_for_status()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        client.get("/v1/usage", params=params).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": server_load.percentile(times, 50), "p99_ms": server_load.percentile(times, 99)}


def measure(tmp: Path, database_url: str, rows: int, repeats: int) -> dict:
    key = server_load.make_keys(database_url, 1)[0]
    key_id = query(database_url, "SELECT id FROM api_keys")[0]["id"]
    now_ms = time.time_ns() // 1_000_000
    seed_s = seed(database_url, key_id, rows, now_ms)
    # Retention longer than the history: a server pruning a backlog meanwhile would be measured instead.
    running = server_load.start(tmp, {"DATABASE_URL": database_url, "MODEL_NAME": "efficientnet_lite0",
                                      "REQUEST_LOG_RETENTION_DAYS": str(DAYS + 1)})
    now_s = now_ms // 1000
    queries = {"totals": {}, "1m over an hour": {"start_time": now_s - 3600, "bucket_width": "1m"},
               "1h over 90 days": {"start_time": now_s - DAYS * 86400, "bucket_width": "1h"},
               "1d over 90 days": {"start_time": now_s - DAYS * 86400, "bucket_width": "1d"},
               "totals, 30 ragged days": {"start_time": now_s - 30 * 86400 - 1234, "end_time": now_s - 777}}
    try:
        with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            assert client.get("/v1/usage").json()["total_requests"] == rows
            timings = {name: timed(client, params, repeats) for name, params in queries.items()}
    finally:
        server_load.stop(running)
    return {"rows": rows, "seed_s": round(seed_s, 1), "log_bytes_per_row": round(bytes_per_row(database_url, "request_log"), 1),
            "rollup_rows": query(database_url, "SELECT count(*) AS n FROM usage_rollups")[0]["n"],
            "rollup_bytes_per_row": round(bytes_per_row(database_url, "usage_rollups"), 1), "usage": timings}


def classify_while_pruning(tmp: Path, database_url: str, rows: int, seconds: float) -> dict:
    """wrk against a server with nothing to prune, then against one pruning the history's older two thirds."""
    key = server_load.make_keys(database_url, 1)[0]
    key_id = query(database_url, "SELECT id FROM api_keys")[0]["id"]
    now_ms = time.time_ns() // 1_000_000
    seed(database_url, key_id, rows, now_ms)
    keys = tmp / "one.keys"
    keys.write_text(key + "\n")
    body = tmp / "photo.json"
    body.write_text(json.dumps({"image": photo_jpeg_base64()}))
    cutoff_ms = now_ms - 30 * DAY_MS
    backlog = query(database_url, "SELECT count(*) AS n FROM request_log WHERE created_at_ms < :t", t=cutoff_ms)[0]["n"]
    results = {}
    for name, retention_days in (("nothing to prune", DAYS + 1), ("pruning", 30)):
        running = server_load.start(tmp, {"DATABASE_URL": database_url, "MODEL_NAME": "efficientnet_lite0",
                                          "REQUEST_LOG_RETENTION_DAYS": str(retention_days)})
        try:
            results[name] = server_load.wrk(running.url, body, keys, seconds, 8)
        finally:
            server_load.stop(running)
        left = query(database_url, "SELECT count(*) AS n FROM request_log WHERE created_at_ms < :t", t=cutoff_ms)[0]["n"]
        results[name]["deleted_rows"] = backlog - left
    return {"rows": rows, "backlog": backlog, "classify": results}


def upgrade_with_a_log(tmp: Path, rows: int, seconds: float) -> dict:
    """Revision 0006 on a SQLite log of `rows` requests from before it, then a server counting them under load."""
    database_url = f"sqlite:///{tmp / 'upgrade.db'}"
    key = server_load.make_keys(database_url, 1)[0]
    now_ms = time.time_ns() // 1_000_000
    seed(database_url, query(database_url, "SELECT id FROM api_keys")[0]["id"], rows, now_ms)
    engine = sync_engine(database_url)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0005")  # the rollups gone, as before them
    engine.dispose()
    started = time.monotonic()
    subprocess.run([sys.executable, "cli.py", "migrate"], cwd=ROOT, env={**os.environ, "DATABASE_URL": database_url},
                   check=True, capture_output=True)
    migrate_s = time.monotonic() - started
    keys, body = tmp / "upgrade.keys", tmp / "upgrade.json"
    keys.write_text(key + "\n")
    body.write_text(json.dumps({"image": photo_jpeg_base64()}))
    running = server_load.start(tmp, {"DATABASE_URL": database_url, "MODEL_NAME": "efficientnet_lite0",
                                      "REQUEST_LOG_RETENTION_DAYS": str(DAYS + 1)})
    try:
        started = time.monotonic()
        during = server_load.wrk(running.url, body, keys, seconds, 8)
        while query(database_url, "SELECT count(*) AS n FROM rollup_backfill")[0]["n"]:
            time.sleep(0.2)
        counted_s = time.monotonic() - started
        after = server_load.wrk(running.url, body, keys, seconds, 8)
    finally:
        server_load.stop(running)
    return {"rows": rows, "migrate_s": round(migrate_s, 2), "counted_within_s": round(counted_s, 1),
            "classify": {"while counting": during, "after": after}}


def photo_jpeg_base64() -> str:
    """skimage's chelsea.png (451x300) as a JPEG in base64, as bench.py posts it."""
    import base64

    import skimage
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB").save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="history sizes (default: 10,000 and 10,000,000)")
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--requests", type=int, default=200, help="calls per query")
    parser.add_argument("--pruning-rows", type=int, default=10_000_000, help="history for classify while pruning")
    parser.add_argument("--seconds", type=float, default=20, help="wrk's run while pruning, and without")
    parser.add_argument("--upgrade-rows", type=int, default=1_000_000, help="the log counted after an upgrade")
    args = parser.parse_args()
    results = []
    postgres = PostgresServer().start() if "postgresql" in args.databases else None
    try:
        for database in args.databases:
            for rows in args.rows or [10_000, 10_000_000]:
                with tempfile.TemporaryDirectory() as tmp:
                    database_url = (postgres.create_database() if database == "postgresql" and postgres
                                    else f"sqlite:///{Path(tmp) / 'usage.db'}")
                    result = {"database": database, **measure(Path(tmp), database_url, rows, args.requests)}
                    results.append(result)
                    print_row(result)
    finally:
        if postgres is not None:
            postgres.remove()
    pruning = None
    if args.pruning_rows:
        with tempfile.TemporaryDirectory() as tmp:
            pruning = classify_while_pruning(Path(tmp), f"sqlite:///{Path(tmp) / 'usage.db'}", args.pruning_rows,
                                             args.seconds)
        print_pruning(pruning)
    upgrade = None
    if args.upgrade_rows:
        with tempfile.TemporaryDirectory() as tmp:
            upgrade = upgrade_with_a_log(Path(tmp), args.upgrade_rows, args.seconds)
        print_upgrade(upgrade)
    out = ROOT / "bench" / "results" / "usage_history.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": results,
                               "classify_while_pruning": pruning, "upgrade_with_a_log": upgrade}, indent=2))


def print_row(result: dict) -> None:
    timings = " | ".join(f"{name} {t['p50_ms']:.1f} / {t['p99_ms']:.1f}" for name, t in result["usage"].items())
    print(f"{result['database']:<10} {result['rows']:>10,} rows (seeded in {result['seed_s']} s; "
          f"{result['log_bytes_per_row']} B a log row, {result['rollup_rows']:,} rollups of "
          f"{result['rollup_bytes_per_row']} B): usage p50 / p99 ms: {timings}", flush=True)


def print_pruning(result: dict) -> None:
    print(f"classify on sqlite with {result['rows']:,} logged requests, {result['backlog']:,} past 30 days:")
    for name, run in result["classify"].items():
        print(f"  {name:<17} {run['requests_per_s']:.1f} requests/s, p50 / p99 {run['p50_ms']:.0f} / "
              f"{run['p99_ms']:.0f} ms, statuses {run['statuses']}, {run['deleted_rows']:,} rows deleted meanwhile",
              flush=True)


def print_upgrade(result: dict) -> None:
    print(f"upgrade on sqlite with {result['rows']:,} logged requests: revision 0006 in {result['migrate_s']} s, "
          f"the log counted into rollups within {result['counted_within_s']} s of the server's start, under load:")
    for name, run in result["classify"].items():
        print(f"  {name:<15} {run['requests_per_s']:.1f} requests/s, p50 / p99 {run['p50_ms']:.0f} / "
              f"{run['p99_ms']:.0f} ms, statuses {run['statuses']}", flush=True)


if __name__ == "__main__":
    main()
