"""Database trouble (its file gone or replaced, its disk full, its lock held by another process) answers 503 with
Retry-After within DB_TIMEOUT_S, never a 500, and clears by itself once the trouble does.

A filesystem turned read-only under the server is not tested: Linux refuses to remount one read-only while
the server has its files open for writing, and as root no file permission makes SQLite's writes fail. Its
errors ("attempt to write a readonly database", "disk I/O error") are among the ones errors.py treats as 503."""

import concurrent.futures
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from conftest import ONE_PIXEL, assert_error, log_rows, make_key, query, server_env, sync_engine


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own, to fill up without touching anything else (needs root)."""
    directory = tmp_path / "small"
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)], capture_output=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {mounted.stderr.decode()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()}")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)


def assert_unavailable(response) -> None:
    assert_error(response, 503, "database_unavailable")
    assert response.headers["Retry-After"] == "1"


def test_a_removed_database_file_is_503_until_a_file_is_back(start_server, tmp_path):
    """SQLite would go on writing into the deleted file, and every answer would be logged where nobody can read
    it: so while no file is at the path, /v1 answers 503 and writes nothing; a restored file is picked up."""
    running = start_server()
    key = make_key(running.database_url)
    path = Path(running.database_url.removeprefix("sqlite:///"))
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        backup = tmp_path / "backup.db"
        with sqlite3.connect(path) as source, sqlite3.connect(backup) as copy:
            source.backup(copy)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert_unavailable(client.post("/v1/classify", json={"image": ONE_PIXEL}))
        assert_unavailable(client.get("/v1/usage"))
        assert_error(client.get("/readyz"), 503, "not_ready")
        assert client.get("/healthz").status_code == 200  # alive: a restart would not bring the file back
        shutil.copy(backup, path)  # restored: a new file (inode) at the path
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/usage").json()["successful_requests"] == 2
    assert [row["status_code"] for row in log_rows(running.database_url, "endpoint = '/v1/classify'")] == [200, 200]
    assert "Traceback" not in running.log()


def test_a_full_disk_is_503_and_clears_when_space_is_freed(small_filesystem, start_server):
    running = start_server(server_env(small_filesystem))
    key = make_key(running.database_url)
    filler = small_filesystem / "filler"
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        with open(filler, "wb", buffering=0) as out:  # every free block; unbuffered, so closing retries nothing
            try:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            except OSError:
                pass
        # SQLite reuses space its files already have, so some writes may still fit; soon one needs a new block.
        statuses = [client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code for _ in range(40)]
        assert set(statuses) <= {200, 503} and 503 in statuses, statuses
        assert_unavailable(client.post("/v1/classify", json={"image": ONE_PIXEL}))
        # Not ready, so a load balancer stops sending work this host would refuse (it said ready: its check read).
        assert_error(client.get("/readyz"), 503, "not_ready")
        filler.unlink()
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    assert "Traceback" not in running.log()


def database_size(database_url: str) -> int:
    if database_url.startswith("sqlite"):
        return query(database_url, "PRAGMA page_count")[0]["page_count"]
    return query(database_url, "SELECT pg_total_relation_size('readiness_check') AS size")[0]["size"]


def test_readiness_writes_and_the_database_does_not_grow_from_it(start_server, database_url):
    running = start_server({"DATABASE_URL": database_url})
    with running.client() as client:
        assert client.get("/readyz").status_code == 200
        size = database_size(database_url)
        [checked] = query(database_url, "SELECT checked_at_ms FROM readiness_check")
        for _ in range(300):
            assert client.get("/readyz").status_code == 200
    [checked_again] = query(database_url, "SELECT checked_at_ms FROM readiness_check")  # still one row, rewritten
    assert checked_again["checked_at_ms"] > checked["checked_at_ms"]
    if database_url.startswith("sqlite"):
        assert database_size(database_url) <= size + 8192  # one row rewritten: at most a page more, whatever the count
    else:  # each UPDATE leaves a dead version until pruning or VACUUM takes it: a few pages, never one per probe
        assert database_size(database_url) <= size + 8 * 8192



@pytest.mark.parametrize("how", ["rm, then cp", "cp beside, then mv over"])
def test_a_backup_copied_over_the_database_is_what_comes_back(start_server, tmp_path, how):
    """`rm classify.db; cp backup.db classify.db` while the server runs: the deleted file's -wal and -shm stay at
    their paths, and SQLite applied that -wal to the backup (10 rows came back where 5 were due). The README's
    way, a copy moved over the file in one step, has the same -wal left beside it."""
    running = start_server()
    key = make_key(running.database_url)
    path = Path(running.database_url.removeprefix("sqlite:///"))
    backup = tmp_path / "backup.db"
    with running.client(key) as client:
        for _ in range(3):
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        # Read once before: the reading thread's connection, kept in its pool, must not read the old file after.
        assert client.get("/v1/usage").json()["total_requests"] == 3
        with sqlite3.connect(path) as source, sqlite3.connect(backup) as copy:
            source.backup(copy)
        for _ in range(5):  # after the backup: lost with the file
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert Path(f"{path}-wal").exists()
        if how == "rm, then cp":
            path.unlink()  # the -wal and -shm stay, as they do when only the database file is removed
            assert_unavailable(client.post("/v1/classify", json={"image": ONE_PIXEL}))
            shutil.copy(backup, path)
        else:
            shutil.copy(backup, f"{path}.new")
            os.replace(f"{path}.new", path)
        for _ in range(2):
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        usage = client.get("/v1/usage").json()
        assert (usage["total_requests"], usage["successful_requests"]) == (3 + 2, 3 + 2)
        assert client.get("/readyz").status_code == 200
    with sqlite3.connect(path) as database:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert list(path.parent.glob(f"{path.name}-wal.stale-*")) and list(path.parent.glob(f"{path.name}-shm.stale-*"))
    assert "was replaced" in running.log() and "Traceback" not in running.log()


LOCK_HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")  # SQLite's one write lock, held until this process is killed
print("locked", flush=True)
time.sleep(600)
"""


def test_with_the_write_lock_held_by_another_process_each_request_waits_db_timeout_s_at_most(start_server):
    """One deadline per request, not per statement: /v1/usage waited 2 x DB_TIMEOUT_S (its log row queued behind
    another's failing commit), /v1/classify 3 x (its admission, then the log's commits), /readyz DB_TIMEOUT_S
    (not its 2 s); and requests waiting for the lock held queue places, so others got 503 `overloaded`."""
    timeout_s = 4
    running = start_server({"DB_TIMEOUT_S": str(timeout_s), "MAX_QUEUE": "2", "MAX_IMAGES_PER_REQUEST": "1"})
    key = make_key(running.database_url)
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, running.database_url.removeprefix("sqlite:///")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"

        def timed(method: str, path: str, delay_s: float, **options) -> tuple[httpx.Response, float]:
            time.sleep(delay_s)
            with running.client(key) as client:
                started = time.monotonic()
                response = client.request(method, path, **options)
                return response, time.monotonic() - started

        one_image = {"json": {"image": ONE_PIXEL}}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            models = pool.submit(timed, "GET", "/v1/models", 0)
            usage = pool.submit(timed, "GET", "/v1/usage", 0.5)  # its row comes while the models row's commit waits
            classify = [pool.submit(timed, "POST", "/v1/classify", 1, **one_image) for _ in range(4)]
            ready = pool.submit(timed, "GET", "/readyz", 1.5)
            time.sleep(2.5)  # the four classify requests are waiting for the lock now
            queued = [line for line in httpx.get(running.url + "/metrics").text.splitlines()
                      if line.startswith("inference_queue_depth ")]
            answers = {"models": models.result(), "usage": usage.result(), "ready": ready.result(),
                       **{f"classify {i}": future.result() for i, future in enumerate(classify)}}
    finally:
        holder.kill()
        holder.wait()
    assert queued == ["inference_queue_depth 0.0"]  # waiting for the database, they hold no place in the queue
    seen = {name: (response.status_code, response.json()["error"]["code"], round(elapsed_s, 1))
            for name, (response, elapsed_s) in answers.items()}
    for name, (response, elapsed_s) in answers.items():
        if name == "ready":
            assert_error(response, 503, "not_ready")
            assert elapsed_s < 3, seen
        else:  # database_unavailable, never overloaded: none of them holds a queue place while it waits
            assert response.json()["error"]["code"] == "database_unavailable", seen
            assert_unavailable(response)
            assert elapsed_s < 1.5 * timeout_s, seen
    with running.client(key) as client:  # recovered by itself
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.get("/readyz").status_code == 200
    # (A 503 `overloaded` whose log row then failed went out as `database_unavailable`; its log line says which.)
    assert "error_code=overloaded" not in running.log() and "Traceback" not in running.log()


def test_on_postgresql_a_request_waits_for_locks_db_timeout_s_at_most_in_all(start_server, postgres):
    """A session holding the key's row (FOR UPDATE) blocks the admission and then the log row's insert: each
    waited lock_timeout (DB_TIMEOUT_S) in turn; the log row now waits only what the admission left."""
    timeout_s = 3
    database_url = postgres.create_database()
    running = start_server({"DATABASE_URL": database_url, "DB_TIMEOUT_S": str(timeout_s)})
    key = make_key(database_url)
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        with sync_engine(database_url).connect() as holder:
            holder.execute(text("SELECT id FROM api_keys FOR UPDATE"))
            started = time.monotonic()
            response = client.post("/v1/classify", json={"image": ONE_PIXEL})
            elapsed_s = time.monotonic() - started
            holder.rollback()
        assert_unavailable(response)
        assert elapsed_s < 1.5 * timeout_s, elapsed_s
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    assert "Traceback" not in running.log()
