"""/v1/usage reads rollups, and they say what counting the request log says: on a random history written by
the server's own database thread, for random ranges with ragged ends, on SQLite and PostgreSQL."""

import asyncio
import math
import random
import time

from conftest import key_id, make_key, query
from db import RequestLog
from ledger.rollups import add_rows
from ledger.writer import DatabaseWriter

STATUSES = [200] * 6 + [400, 413, 422, 429, 429, 499, 500, 503, 504]
HISTORY_S = 3 * 86400


def random_rows(key_ids: list[int | None], count: int, now_ms: int, seed: int, replayed_share: float = 0.0
                ) -> list[dict]:
    """Log rows as the server writes them; `replayed_share` of them replayed answers (Idempotency-Key)."""
    chance = random.Random(seed)
    return [{"key_id": chance.choice(key_ids), "endpoint": chance.choice(["/v1/classify"] * 5 + ["/v1/models"]),
             "replayed": chance.random() < replayed_share,
             "method": "POST", "status_code": chance.choice(STATUSES),
             "latency_ms": chance.choice([chance.uniform(0.2, 0.99), math.exp(chance.uniform(0, 10))]),
             "created_at_ms": now_ms - chance.randrange(HISTORY_S * 1000), "error_code": None, "request_id": None,
             "model_version": chance.choice(["a1", "b2", None]), "images": chance.choice([0, 1, 1, 3, 16])}
            for _ in range(count)]


def write_as_the_server_does(database_url: str, rows: list[dict]) -> None:
    """Through the server's database thread, with its rollups, several rows to a group as under load."""
    async def write() -> None:
        writer = DatabaseWriter(database_url, 10, {RequestLog: add_rows})
        writer.start()
        try:
            for first in range(0, len(rows), 50):
                await asyncio.gather(*[writer.insert(RequestLog, row) for row in rows[first:first + 50]])
        finally:
            await writer.stop()

    asyncio.run(write())


def counted_from_the_log(database_url: str, own_id: int, start_s: int, end_s: int) -> dict:
    rows = query(database_url, "SELECT status_code, latency_ms, images FROM request_log WHERE key_id = :key AND "
                 "endpoint = '/v1/classify' AND NOT replayed AND created_at_ms >= :start AND created_at_ms < :end",
                 key=own_id, start=start_s * 1000, end=end_s * 1000)
    statuses = [row["status_code"] for row in rows]
    return {"total_requests": len(rows), "successful_requests": statuses.count(200),
            "images": sum(row["images"] or 0 for row in rows),
            "by_status": {"succeeded": statuses.count(200), "rate_limited": statuses.count(429),
                          "client_errors": sum(1 for s in statuses if 400 <= s < 500 and s != 429),
                          "server_errors": sum(1 for s in statuses if s >= 500)},
            "latencies": sorted(row["latency_ms"] for row in rows)}


def assert_near_percentiles(estimated: dict, latencies: list[float]) -> None:
    """Within the histogram's stated bound: a factor of 2^(1/4) of the nearest-rank percentile (to 0.01 ms); 0.5
    under 1 ms."""
    if not latencies:
        assert estimated == {"p50": None, "p95": None, "p99": None}
        return
    for name, fraction in {"p50": 0.5, "p95": 0.95, "p99": 0.99}.items():
        exact = latencies[max(1, math.ceil(fraction * len(latencies))) - 1]
        if exact < 1:
            assert estimated[name] == 0.5
        else:
            # the bucket's middle, rounded to 0.01 ms
            assert exact * 2 ** -0.25 - 0.005 <= estimated[name] <= exact * 2 ** 0.25 + 0.005, (name, estimated, exact)


def assert_figures_match(answer: dict, counted: dict) -> None:
    for name in ("total_requests", "successful_requests", "images", "by_status"):
        assert answer[name] == counted[name], (name, answer, {k: v for k, v in counted.items() if k != "latencies"})
    assert_near_percentiles(answer["latency_ms"], counted["latencies"])


def test_usage_from_rollups_equals_counting_the_log(database_url, start_server):
    mine, other = make_key(database_url), make_key(database_url)
    own_id = key_id(database_url, mine)
    now_ms = time.time_ns() // 1_000_000
    write_as_the_server_does(database_url, random_rows([own_id, own_id, own_id, key_id(database_url, other), None],
                                                       4000, now_ms, seed=13, replayed_share=0.05))
    running = start_server({"DATABASE_URL": database_url})
    chance = random.Random(7)
    now_s = now_ms // 1000
    with running.client(mine) as client:
        everything = client.get("/v1/usage").json()
        assert_figures_match(everything, counted_from_the_log(database_url, own_id, 0, now_s + 60))
        latencies = counted_from_the_log(database_url, own_id, 0, now_s + 60)["latencies"]
        assert abs(everything["avg_response_time_ms"] - sum(latencies) / len(latencies)) <= 0.01
        seen = 0
        for _ in range(30):
            start = now_s - chance.randrange(HISTORY_S + 3600)  # ragged: any second, some before the history
            end = start + chance.choice([chance.randrange(1, 600), chance.randrange(1, 2 * 86400)])
            width = chance.choice([None, "1m", "1h", "1d"])
            if width == "1m" and end - start > 2000 * 60:
                width = "1h"
            params = {"start_time": start, "end_time": end, **({"bucket_width": width} if width else {})}
            answer = client.get("/v1/usage", params=params).json()
            # The range counted is the one asked for, rounded out to whole minutes (to whole buckets with them).
            width_s = {None: 60, "1m": 60, "1h": 3600, "1d": 86400}[width]
            assert answer["start_time"] == start // width_s * width_s <= start
            assert answer["end_time"] == -(-end // width_s) * width_s >= end
            counted = counted_from_the_log(database_url, own_id, answer["start_time"], answer["end_time"])
            assert_figures_match(answer, counted)
            seen += counted["total_requests"]
            if counted["total_requests"]:
                assert answer["success_rate"] == round(100 * counted["successful_requests"] / counted["total_requests"], 2)
            for bucket in answer["buckets"] or []:
                assert_figures_match(bucket, counted_from_the_log(database_url, own_id, bucket["start_time"],
                                                                  bucket["end_time"]))
    assert seen > 1000  # the ranges held requests to count
