"""GET /v1/usage and the request log behind it: every /v1 request is a row before its answer arrives.
The counting rules are checked on every backend; the failure modes below are SQLite's, but for the rows
PostgreSQL refuses (test_scaleout.py has PostgreSQL's and Redis's outages)."""

import asyncio
import sqlite3
import time

import httpx
import pytest
from PIL import Image
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from conftest import ONE_PIXEL, assert_error, b64, encode, key_id, log_rows, make_key, query
from ledger.usage import buckets_query, totals_query


def test_usage_counts_this_keys_classify_requests_of_every_outcome(backend_server):
    key = make_key(backend_server.database_url, rate_limit=6, window_s=60)
    other = make_key(backend_server.database_url)
    with backend_server.client(key) as client, backend_server.client(other) as other_client:
        fresh = client.get("/v1/usage").json()
        assert (fresh["total_requests"], fresh["successful_requests"], fresh["success_rate"]) == (0, 0, 0.0)
        assert (fresh["limit"], fresh["window_seconds"], fresh["remaining"], fresh["reset_seconds"]) == (6, 60, 6, 0)
        statuses = [client.post("/v1/classify", json=body).status_code for body in
                    [{"image": ONE_PIXEL}] * 3 + [{"image": "%%%"}, {"image": b64(b"text")}, {"top_k": 3}]
                    + [{"image": ONE_PIXEL}] * 2]
        assert statuses == [200, 200, 200, 400, 400, 422, 429, 429]
        client.get("/v1/models")
        other_client.post("/v1/classify", json={"image": ONE_PIXEL})  # someone else's: not ours to count
        usage = client.get("/v1/usage").json()
    assert usage["total_requests"] == 8
    assert usage["successful_requests"] == 3
    assert usage["success_rate"] == 37.5
    assert usage["avg_response_time_ms"] > 0
    assert usage["remaining"] == 0 and 0 < usage["reset_seconds"] <= 60
    assert usage["key_prefix"] == key[:11]
    assert usage["buckets"] is None


def test_usage_counts_embeddings_requests_apart_from_classify_ones(server):
    key = make_key(server.database_url)
    with server.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert [client.post("/v1/embeddings", json=body).status_code for body in
                ({"image": ONE_PIXEL}, {"images": [ONE_PIXEL] * 3}, {"image": "%%%"})] == [200, 200, 400]
        classify = client.get("/v1/usage").json()
        embeddings = client.get("/v1/usage", params={"endpoint": "embeddings", "start_time": int(time.time()) - 60,
                                                      "bucket_width": "1m"}).json()
        unknown = client.get("/v1/usage", params={"endpoint": "models"})
    assert (classify["endpoint"], classify["total_requests"], classify["images"]) == ("classify", 1, 1)
    assert (embeddings["endpoint"], embeddings["total_requests"], embeddings["successful_requests"],
            embeddings["images"]) == ("embeddings", 3, 2, 5)  # the refused one carried an image too
    assert sum(bucket["total_requests"] for bucket in embeddings["buckets"]) == 3
    assert_error(unknown, 422)


def test_usage_buckets_count_per_minute_hour_and_day(backend_server):
    key = make_key(backend_server.database_url)
    now = int(time.time())  # every request below is at or after `now`: in the bucket that holds it, or a later one
    end = now + 60
    with backend_server.client(key) as client:
        for _ in range(3):
            client.post("/v1/classify", json={"image": ONE_PIXEL}).raise_for_status()
        client.post("/v1/classify", json={"image": "nope"})
        ranges = {"1m": end - 5 * 60, "1h": end - 3 * 3600, "1d": end - 7 * 86400}
        by_width = {width: client.get("/v1/usage", params={"start_time": start, "end_time": end, "bucket_width": width}).json()
                    for width, start in ranges.items()}
        to_now = client.get("/v1/usage", params={"start_time": now - 100, "bucket_width": "1m"}).json()
        before = client.get("/v1/usage", params={"start_time": now - 3600, "end_time": now - 1800}).json()
    for width, width_s in {"1m": 60, "1h": 3600, "1d": 86400}.items():
        usage = by_width[width]
        # Rounded out to whole buckets, each one rollup row: start down, end up.
        first, last = ranges[width] // width_s * width_s, -(-end // width_s) * width_s
        assert (usage["start_time"], usage["end_time"]) == (first, last)
        assert len(usage["buckets"]) == (last - first) // width_s
        assert usage["buckets"][0]["start_time"] == first and usage["buckets"][-1]["end_time"] == last
        assert all(b["end_time"] - b["start_time"] == width_s for b in usage["buckets"])
        assert sum(b["total_requests"] for b in usage["buckets"]) == usage["total_requests"] == 4
        assert sum(b["successful_requests"] for b in usage["buckets"]) == usage["successful_requests"] == 3
        assert sum(b["images"] for b in usage["buckets"]) == usage["images"] == 4
        assert usage["by_status"] == {"succeeded": 3, "client_errors": 1, "rate_limited": 0, "server_errors": 0}
        # Not all in now's bucket: the requests may cross a minute's end (seen: 1 in now's, 3 in the next)
        assert sum(b["total_requests"] for b in usage["buckets"] if b["end_time"] > now) == 4
    assert to_now["end_time"] >= now + 1 and to_now["buckets"][-1]["end_time"] == to_now["end_time"]  # cut at now
    assert sum(b["total_requests"] for b in to_now["buckets"]) == 4
    assert before["total_requests"] == 0 and before["buckets"] is None


@pytest.mark.parametrize("params, status, code", [
    ({"bucket_width": "1m"}, 400, "missing_start_time"),
    ({"start_time": 2000, "end_time": 1000}, 400, "invalid_time_range"),
    ({"start_time": 0, "bucket_width": "1m"}, 400, "too_many_buckets"),
    ({"start_time": 1_700_000_000, "end_time": 1_700_000_000 + 86400 * 2, "bucket_width": "1m"}, 400, "too_many_buckets"),
    ({"start_time": -1}, 422, "invalid_request"),
    ({"end_time": 10 ** 20}, 422, "invalid_request"),
    ({"start_time": "yesterday"}, 422, "invalid_request"),
    ({"start_time": 0, "bucket_width": "5m"}, 422, "invalid_request"),
])
def test_usage_refuses_bad_ranges(api, params, status, code):
    assert_error(api.get("/v1/usage", params=params), status, code)


def test_every_v1_request_is_logged_before_its_answer(backend_server):
    key = make_key(backend_server.database_url, rate_limit=2, window_s=60)
    own_id = key_id(backend_server.database_url, key)
    too_big = encode(Image.new("RGB", (6000, 6000)), "JPEG")
    with backend_server.client(key) as client, backend_server.client() as anonymous:
        anonymous_before = len(log_rows(backend_server.database_url, "key_id IS NULL"))
        expected = []
        for send, status, code in [
            (lambda: client.post("/v1/classify", json={"image": ONE_PIXEL}), 200, None),
            (lambda: client.post("/v1/classify", json={"image": b64(too_big)}), 413, "image_too_large"),
            (lambda: client.post("/v1/classify", json={"image": ONE_PIXEL}), 429, "rate_limit_exceeded"),
            (lambda: client.get("/v1/usage", params={"start_time": -5}), 422, "invalid_request"),
            (lambda: client.get("/v1/models"), 200, None),
        ]:
            assert send().status_code == status
            expected.append((status, code))
            rows = log_rows(backend_server.database_url, "key_id = :key_id", key_id=own_id)
            assert [(row["status_code"], row["error_code"]) for row in rows] == expected  # already there
        assert anonymous.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 401
        assert anonymous.get("/v1/nothing-here").status_code == 404
        assert anonymous.get("/v1").status_code == 404
        anonymous_rows = log_rows(backend_server.database_url, "key_id IS NULL")[anonymous_before:]
    assert [(r["endpoint"], r["status_code"], r["error_code"]) for r in anonymous_rows] == [
        ("/v1/classify", 401, "missing_api_key"), ("/v1/nothing-here", 404, "not_found"), ("/v1", 404, "not_found")]
    row = rows[0]
    assert (row["endpoint"], row["method"]) == ("/v1/classify", "POST")
    assert row["latency_ms"] > 0 and abs(row["created_at_ms"] / 1000 - time.time()) < 60


def test_an_answer_the_log_cannot_record_is_not_given(start_server):
    """With the database's write lock held elsewhere, the row cannot be written, so the client gets a 503 with
    Retry-After instead of its 200 (an answer given before its row would be missing from the books)."""
    running = start_server({"DB_TIMEOUT_S": "0.5"})
    key = make_key(running.database_url)
    with running.client(key) as client:
        assert client.get("/v1/models").status_code == 200
        blocker = sqlite3.connect(running.database_url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            models = client.get("/v1/models")  # reads work; only its log row needs the write lock
            classify = client.post("/v1/classify", json={"image": ONE_PIXEL})
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        for refused in (models, classify):
            assert_error(refused, 503, "database_unavailable")
            assert refused.headers["Retry-After"] == "1"
        assert "X-RateLimit-Remaining" not in classify.headers  # the limiter could not write either: not admitted
        assert client.get("/v1/models").status_code == 200  # recovered by itself
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    assert "Traceback" not in running.log()


def test_an_unexpected_failure_is_a_logged_500_in_the_one_error_shape(start_server):
    """A key row no code path can write (a text window) makes the limiter fail: a bug, so a 500; but the body
    has the usual shape without internals, the traceback goes to the server log, the request to the request log."""
    running = start_server()
    key = make_key(running.database_url)
    broken = sqlite3.connect(running.database_url.removeprefix("sqlite:///"))
    with broken:
        broken.execute("UPDATE api_keys SET window_s = 'soon' WHERE id = ?", (key_id(running.database_url, key),))
    broken.close()
    with running.client(key) as client:
        response = client.post("/v1/classify", json={"image": ONE_PIXEL})
        error = assert_error(response, 500, "internal_error")
        assert error["type"] == "server_error" and "Traceback" not in response.text
        assert client.get("/readyz").status_code == 200
    assert "Traceback" in running.log()
    rows = log_rows(running.database_url, "key_id = :key_id", key_id=key_id(running.database_url, key))
    assert [(row["status_code"], row["error_code"]) for row in rows] == [(500, "internal_error")]


def test_a_broken_schema_is_a_500_not_a_503_that_never_clears(start_server):
    running = start_server()
    key = make_key(running.database_url)
    broken = sqlite3.connect(running.database_url.removeprefix("sqlite:///"))
    with broken:
        broken.execute("DROP TABLE rate_limit_hits")
    broken.close()
    with running.client(key) as client:
        response = client.post("/v1/classify", json={"image": ONE_PIXEL})
    assert_error(response, 500, "internal_error")
    assert "Retry-After" not in response.headers


def test_usage_reads_ranges_of_the_rollups_primary_key(server):
    """Each of usage.py's statements reads a range of (key, width, start): its cost is the buckets', whatever the
    key's history (bench/usage_history.py measures it)."""
    statements = [totals_query(1, "/v1/classify", 1_700_000_000 - 7 * 60, 1_700_000_000 + 3 * 86400 + 5 * 3600 + 60),
                  totals_query(1, "/v1/classify", 1_700_000_000 - 7 * 60, None),
                  buckets_query(1, "/v1/classify", 3600, 1_700_000_000, 1_700_086400)]
    connection = sqlite3.connect(server.database_url.removeprefix("sqlite:///"))
    try:
        for statement in statements:
            sql = str(statement.compile(dialect=sqlite_dialect(), compile_kwargs={"literal_binds": True}))
            plan = [row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()]
            searches = [step for step in plan if step.startswith(("SEARCH", "SCAN"))]
            assert searches and all(step.startswith("SEARCH usage_rollups USING PRIMARY KEY (key_id=? AND width_s=? "
                                                    "AND start_ms>") for step in searches), plan
    finally:
        connection.close()


def test_readiness_fails_while_the_database_cannot_be_written_and_recovers(start_server):
    running = start_server({"DB_TIMEOUT_S": "0.5"})
    with running.client() as client:
        assert client.get("/readyz").status_code == 200
        blocker = sqlite3.connect(running.database_url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            assert_error(client.get("/readyz"), 503, "not_ready")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert client.get("/readyz").status_code == 200


def classify_amid_loops(url: str, key: str, path: str, loop_key: str | None) -> tuple[list[httpx.Response],
                                                                                     list[httpx.Response]]:
    """40 classify requests with `key`, sent at once, while 20 loops GET `path` (with `loop_key`) until they are
    all answered: the two kinds' log rows share commits. The answers to each."""
    def headers(key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def send_all() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=60)) as client:
            is_done = False

            async def loop() -> list[httpx.Response]:
                answers = []
                while not is_done:
                    answers.append(await client.get(path, headers=headers(loop_key)))
                return answers

            loops = [asyncio.create_task(loop()) for _ in range(20)]
            classified = await asyncio.gather(*[client.post("/v1/classify", json={"image": ONE_PIXEL},
                                                            headers=headers(key)) for _ in range(40)])
            is_done = True
            return classified, [answer for looped in loops for answer in await looped]

    return asyncio.run(send_all())


def test_on_postgresql_a_nul_in_the_path_is_logged_and_breaks_no_other_answer(postgres, start_server):
    """`GET /v1/%00` reaches the log with a NUL in its path, which PostgreSQL refuses in text: the row holds the
    path percent-encoded, and the classify requests whose rows share its commit are answered 200."""
    running = start_server({"DATABASE_URL": postgres.create_database()})
    key = make_key(running.database_url)
    classified, looped = classify_amid_loops(running.url, key, "/v1/%00", None)
    assert [r.status_code for r in classified] == [200] * 40
    assert {r.status_code for r in looped} == {404}
    assert_error(looped[0], 404, "not_found")
    assert len(log_rows(running.database_url, "endpoint = '/v1/%00'")) == len(looped)
    with running.client(key) as client:
        assert client.get("/v1/usage").json()["total_requests"] == 40
    assert "Traceback" not in running.log()


def test_on_postgresql_a_row_the_database_refuses_fails_only_its_own_request(postgres, start_server):
    """Rows answered at the same moment go in one INSERT. One the database refuses for good (here: its key was
    deleted behind the server's back, which still has it cached, so its foreign key fails) makes the group be
    written row by row: that request gets the 500, the ones beside it their answers and their rows."""
    running = start_server({"DATABASE_URL": postgres.create_database(), "KEY_CACHE_TTL_S": "600"})
    doomed, kept = make_key(running.database_url), make_key(running.database_url)
    with running.client(doomed) as client:
        assert client.get("/v1/models").status_code == 200  # cached from now on
    doomed_id = key_id(running.database_url, doomed)
    for table in ("request_log", "rate_limit_hits", "usage_rollups", "api_keys"):
        query(running.database_url, f"DELETE FROM {table} WHERE {'id' if table == 'api_keys' else 'key_id'} = :id",
              id=doomed_id)
    classified, looped = classify_amid_loops(running.url, kept, "/v1/models", doomed)
    assert [r.status_code for r in classified] == [200] * 40
    for refused in looped:
        assert_error(refused, 500, "internal_error")
    rows = log_rows(running.database_url, "key_id = :id", id=key_id(running.database_url, kept))
    assert [row["status_code"] for row in rows] == [200] * 40
