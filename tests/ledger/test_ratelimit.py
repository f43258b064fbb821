"""The per-key sliding window: exact under concurrency, across processes and restarts; honest headers.
The rules are checked on every backend: SQLite and PostgreSQL, each with and without Redis."""

import asyncio
import sqlite3
import time

import httpx
import pytest
from sqlalchemy import select

from conftest import ONE_PIXEL, assert_error, key_id, make_key, query, raw_http
from db import make_engine, migrate, write_transaction


def burst(url: str, key: str, count: int) -> list[httpx.Response]:
    """`count` classify requests at once, each on its own connection."""
    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     limits=limits) as client:
            return await asyncio.gather(*[client.post("/v1/classify", json={"image": ONE_PIXEL}) for _ in range(count)])

    return asyncio.run(send_all())


def statuses(responses: list[httpx.Response]) -> list[int]:
    return sorted(response.status_code for response in responses)


def test_a_burst_of_20_against_a_limit_of_5_admits_exactly_5(backend_server):
    key = make_key(backend_server.database_url, rate_limit=5, window_s=60)
    responses = burst(backend_server.url, key, 20)
    assert statuses(responses) == [200] * 5 + [429] * 15
    admitted = [r for r in responses if r.status_code == 200]
    assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in admitted) == [0, 1, 2, 3, 4]
    for refused in (r for r in responses if r.status_code == 429):
        assert_error(refused, 429, "rate_limit_exceeded")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["X-RateLimit-Remaining"] == "0"


def test_every_answer_carries_the_rate_limit_headers(backend_server):
    key = make_key(backend_server.database_url, rate_limit=10, window_s=30)
    with backend_server.client(key) as client:
        ok = client.post("/v1/classify", json={"image": ONE_PIXEL})
        assert ok.headers["X-RateLimit-Limit"] == "10"
        assert ok.headers["X-RateLimit-Remaining"] == "9"
        assert 29 <= int(ok.headers["X-RateLimit-Reset"]) <= 30
        assert ok.headers["RateLimit-Policy"] == '"default";q=10;w=30'
        assert ok.headers["RateLimit"] == f'"default";r=9;t={ok.headers["X-RateLimit-Reset"]}'
        bad_image = client.post("/v1/classify", json={"image": "not base64!"})
        assert bad_image.status_code == 400
        assert bad_image.headers["X-RateLimit-Remaining"] == "8"  # admitted, so it counted, and it says so


def test_a_refused_request_of_several_images_says_how_many_are_still_admissible(backend_server):
    """Limit 5: three images leave 2; three more are refused, and Remaining still says 2 (a single image is
    admitted right after), while Retry-After says when three fit."""
    key = make_key(backend_server.database_url, rate_limit=5, window_s=60)
    with backend_server.client(key) as client:
        three = {"images": [ONE_PIXEL] * 3}
        assert client.post("/v1/classify", json=three).headers["X-RateLimit-Remaining"] == "2"
        refused = client.post("/v1/classify", json=three)
        assert_error(refused, 429, "rate_limit_exceeded")
        assert refused.headers["X-RateLimit-Remaining"] == "2"
        assert refused.headers["RateLimit"] == f'"default";r=2;t={refused.headers["X-RateLimit-Reset"]}'
        assert 50 <= int(refused.headers["Retry-After"]) <= 60  # when the first three leave the window
        one = client.post("/v1/classify", json={"image": ONE_PIXEL})
        assert one.status_code == 200 and one.headers["X-RateLimit-Remaining"] == "1"
        assert client.get("/v1/usage").json()["remaining"] == 1


def test_the_window_slides_instead_of_resetting_in_fixed_buckets(backend_server):
    """3 per 6 s: one request at t=0, two at t=3. At t=6.5 only the first has left the window, so exactly one
    more is admitted; any fixed 6 s bucket would either have refused at t=3 or admitted three at t=6.5."""
    key = make_key(backend_server.database_url, rate_limit=3, window_s=6)
    with backend_server.client(key) as client:
        def post() -> httpx.Response:
            return client.post("/v1/classify", json={"image": ONE_PIXEL})

        started = time.monotonic()
        assert post().status_code == 200
        time.sleep(max(0.0, started + 3 - time.monotonic()))
        assert [post().status_code, post().status_code] == [200, 200]
        refused = post()
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 3  # the t=0 request leaves at t=6
        time.sleep(max(0.0, started + 6.5 - time.monotonic()))
        assert post().status_code == 200
        refused = post()
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 3  # the t=3 requests leave at t=9


def test_refused_requests_do_not_use_up_the_window(backend_server):
    """2 per 3 s: two at t=0, refusals at t=2; at t=3.3 the first two have left the window, and the refusals
    (still inside it, were they counted) must not stop two more."""
    key = make_key(backend_server.database_url, rate_limit=2, window_s=3)
    with backend_server.client(key) as client:
        def statuses_of(count: int) -> list[int]:
            return [client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code for _ in range(count)]

        started = time.monotonic()
        assert statuses_of(2) == [200, 200]
        time.sleep(max(0.0, started + 2 - time.monotonic()))
        assert statuses_of(5) == [429] * 5
        time.sleep(max(0.0, started + 3.3 - time.monotonic()))
        assert statuses_of(3) == [200, 200, 429]


def test_a_throttled_client_is_refused_before_its_body_is_read(backend_server):
    server = backend_server
    if server.command[-1] == "main.py":
        # Issue 27, open: under two workers, the one that has not yet admitted the key reads the body before it
        # refuses (seen once in four runs: no answer within 15 s, the body never sent). Not yet fixed.
        pytest.xfail("a worker that has not admitted this key yet waits for the body before the 429")
    key = make_key(server.database_url, rate_limit=1, window_s=60)
    with server.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 429
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n").encode()
    status, _, response = raw_http(server.port, head)  # no body byte sent: the server must not wait for them
    assert status == 429
    assert b"Retry-After: " in response.replace(b"retry-after", b"Retry-After")


def test_a_write_transaction_holds_the_lock_from_its_first_statement(tmp_path):
    """What makes admission atomic on SQLite: BEGIN IMMEDIATE, not whatever statement comes first."""
    path = tmp_path / "lock.db"

    async def hold_and_probe() -> str:
        engine = make_engine(f"sqlite:///{path}", timeout_s=1)
        await migrate(engine)
        async with write_transaction(engine) as connection:
            await connection.execute(select(1))  # a read: a deferred transaction would hold no lock yet
            probe = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                return "not locked"
            except sqlite3.OperationalError as exc:
                return str(exc)
            finally:
                probe.close()
        await engine.dispose()

    assert asyncio.run(hold_and_probe()) == "database is locked"


def test_the_window_survives_a_restart(start_server):
    running = start_server()
    key = make_key(running.database_url, rate_limit=3, window_s=60)
    assert statuses(burst(running.url, key, 3)) == [200, 200, 200]
    running.stop()
    running.start()
    with running.client(key) as client:
        refused = client.post("/v1/classify", json={"image": ONE_PIXEL})
        assert refused.status_code == 429
        assert 30 < int(refused.headers["Retry-After"]) <= 60


def test_two_worker_processes_on_one_database_admit_exactly_the_limit(start_server):
    running = start_server(workers=2)
    deadline = time.monotonic() + 120
    while running.log().count("Application startup complete") < 2:  # both workers accepting
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.2)
    key = make_key(running.database_url, rate_limit=5, window_s=60)
    assert statuses(burst(running.url, key, 24)) == [200] * 5 + [429] * 19


# What an older server does to the rows without the kept count (rate_limit_counts, revision 0007): records hits,
# at the database's clock on PostgreSQL, and deletes expired ones.
CLOCK_MS = {"sqlite": "CAST(strftime('%s', 'now') AS INTEGER) * 1000 + CAST(strftime('%f', 'now') * 1000 AS INTEGER) % 1000",
            "postgresql": "floor(extract(epoch FROM clock_timestamp()) * 1000)"}


def record_as_an_old_server(database_url: str, key: str, hits: int) -> None:
    clock = CLOCK_MS["postgresql" if database_url.startswith("postgresql") else "sqlite"]
    for _ in range(hits):
        query(database_url, f"INSERT INTO rate_limit_hits (key_id, at_ms) VALUES (:id, {clock})",
              id=key_id(database_url, key))


def delete_expired_as_an_old_server(database_url: str, key: str, rows: int) -> None:
    query(database_url, "DELETE FROM rate_limit_hits WHERE id IN (SELECT id FROM rate_limit_hits WHERE key_id = :id "
                        "ORDER BY at_ms LIMIT :rows)", id=key_id(database_url, key), rows=rows)


def admitted(url: str, key: str, count: int) -> int:
    """How many of `count` requests sent one after the other are admitted; every other answer is a 429."""
    responses = [httpx.post(f"{url}/v1/classify", json={"image": ONE_PIXEL}, timeout=60,
                            headers={"Authorization": f"Bearer {key}"}) for _ in range(count)]
    assert set(statuses(responses)) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
    return statuses(responses).count(200)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


WINDOW_S = 2


def test_a_count_that_fell_behind_its_rows_heals_within_a_window(database_url, start_server):
    """An older server's admissions beside this one (revision 0007's rolling upgrade) leave the kept count
    under the rows. It held for good: every later window admitted the rows it never counted on top of the
    limit (10 at a limit of 5). Here 5 are recorded mid-window while the key's own hit leaves (the count would
    stay at 0 against 5 rows): within a window of the last check the rows are counted again."""
    running = start_server({"DATABASE_URL": database_url})
    key = make_key(database_url, rate_limit=5, window_s=WINDOW_S)
    started = time.monotonic()
    assert admitted(running.url, key, 1) == 1
    sleep_until(started + WINDOW_S / 2)
    record_as_an_old_server(database_url, key, 5)
    recorded = time.monotonic()
    sleep_until(started + WINDOW_S + 0.3)  # the first hit has left; the old server's 5 are in the window
    assert admitted(running.url, key, 6) == 0
    sleep_until(recorded + WINDOW_S + 0.3)  # and now they have left too
    assert admitted(running.url, key, 8) == 5
    assert "kept count was" in running.log()


def test_a_count_that_ran_ahead_of_its_rows_heals_within_a_window_and_is_never_a_500(database_url, start_server):
    """An older server deleting expired rows without the count leaves it over the rows. With 4 of 5 gone so,
    the key got 1 request a window for good; with all 5, and whenever a lowered limit put the freeing hit past
    the last row, every request was a 500 (the offset lookup found no row)."""
    running = start_server({"DATABASE_URL": database_url})
    for gone in (5, 4):
        key = make_key(database_url, rate_limit=5, window_s=WINDOW_S)
        started = time.monotonic()
        assert admitted(running.url, key, 5) == 5
        sleep_until(started + WINDOW_S + 0.3)
        delete_expired_as_an_old_server(database_url, key, gone)
        assert admitted(running.url, key, 8) == 5, gone
