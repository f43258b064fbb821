"""What a request costs outside the model (issue 11): its writes share transactions with the other requests'
of the moment, no dependency takes a thread-pool hop, and the event loop's CPU per classify request is a small
multiple of a bare answer's."""

import asyncio
import concurrent.futures
import inspect
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import ONE_PIXEL, b64, encode, make_key, photo

LOCK_HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")  # SQLite's one write lock, held until this process is killed
print("locked", flush=True)
time.sleep(600)
"""
WAL_HEADER = 32
WAL_FRAME_HEADER = 24


def commits_in_wal(database: Path) -> int:
    """Transactions committed into the database's write-ahead log since it last restarted: its frames that end a
    commit (a non-zero database size) and carry the log's current salt."""
    wal = Path(f"{database}-wal").read_bytes()
    page_size = struct.unpack(">I", wal[8:12])[0]
    salt = wal[16:24]
    commits = 0
    for offset in range(WAL_HEADER, len(wal) - WAL_FRAME_HEADER, WAL_FRAME_HEADER + page_size):
        size_after_commit = struct.unpack(">I", wal[offset + 4:offset + 8])[0]
        if wal[offset + 8:offset + 16] != salt:
            break  # frames of an earlier round of the log
        commits += size_after_commit != 0
    return commits


def test_requests_waiting_for_the_write_lock_are_admitted_and_logged_in_a_few_transactions(start_server):
    """Ten classify requests arrive while another process holds SQLite's write lock. Once it is released, their
    admissions go in one group (two: the first waited alone) and their log rows in at most one each (a few, as
    the model answers them in batches): twelve at most. Before, every admission took the lock in a transaction
    of its own, ten commits and the log's on top (16 measured)."""
    running = start_server({"DB_TIMEOUT_S": "30"})
    key = make_key(running.database_url)
    database = Path(running.database_url.removeprefix("sqlite:///"))
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(database)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = commits_in_wal(database)

        def classify() -> int:
            with running.client(key) as client:
                return client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = [pool.submit(classify) for _ in range(10)]
            time.sleep(2)  # every admission is waiting for the lock by now
            holder.kill()
            holder.wait()
            assert [answer.result() for answer in answers] == [200] * 10
    finally:
        holder.kill()
        holder.wait()
    commits = commits_in_wal(database) - before
    assert 2 <= commits <= 12, commits


def test_no_dependency_runs_in_the_thread_pool():
    """FastAPI runs a plain `def` dependency in AnyIO's thread pool: a hop to another thread and back for each
    request. Every dependency of every route is async."""
    import main
    from edge import api_docs
    from operations import metrics

    def is_async(call: object) -> bool:
        method = call if inspect.isfunction(call) or inspect.ismethod(call) else getattr(call, "__call__", None)
        return inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)

    def sync_dependencies(dependant, route: str) -> list[str]:
        found = []
        for dependency in dependant.dependencies:
            if not is_async(dependency.call):
                found.append(f"{route}: {getattr(dependency.call, '__name__', dependency.call)}")
            found += sync_dependencies(dependency, route)
        return found

    routes = [*main.router.routes, *api_docs.router.routes, *metrics.router.routes]
    assert len(routes) > 5
    assert [name for route in routes for name in sync_dependencies(route.dependant, route.path)] == []


def loop_cpu_s(pid: int) -> float:
    """CPU time of the server's event loop: its main thread, whose id is the process's."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks


def test_the_event_loop_spends_a_few_bare_answers_on_a_classify_request(start_server):
    """The event loop's CPU for a classify request of the 451x300 photo (key, limit, body, hand-offs to the
    decoding threads, the model and the database thread, the answer, its log row) against its CPU for a
    /healthz answer (HTTP and the middlewares alone), both measured alike, 4 clients at once: 4.6 ms against
    0.40 (11 times) before, when the admission's statements each took a greenlet and a thread hop and four
    dependencies a hop each; 2.1 against 0.43 (5 times) now."""
    running = start_server()
    key = make_key(running.database_url)
    # The benchmark's request (bench/bench.py): the photo as a JPEG, in base64 in JSON.
    body = json.dumps({"image": b64(encode(photo("chelsea.png").convert("RGB"), "JPEG", quality=90))}).encode()

    async def measure(path: str, count: int, **request) -> float:
        async with httpx.AsyncClient(base_url=running.url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=60) as client:
            async def one_client(requests: int) -> None:
                for _ in range(requests):
                    response = await client.request("POST" if "content" in request else "GET", path, **request)
                    assert response.status_code == 200, response.text

            await asyncio.gather(*(one_client(5) for _ in range(4)))  # warm
            started = loop_cpu_s(running.process.pid)
            await asyncio.gather(*(one_client(count // 4) for _ in range(4)))
            return (loop_cpu_s(running.process.pid) - started) / count

    bare = asyncio.run(measure("/healthz", 800))
    classify = asyncio.run(measure("/v1/classify", 200, content=body, headers={"Content-Type": "application/json"}))
    assert classify < 8 * bare, (classify * 1000, bare * 1000)
