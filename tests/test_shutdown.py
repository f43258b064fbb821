"""The books across stops: every answer a client got is in the log after SIGTERM (exactly) and after SIGKILL
(at least); SIGTERM answers what it admitted, and past SHUTDOWN_TIMEOUT_S answers the rest 503, then exits."""

import concurrent.futures
import signal
import sqlite3
import threading
import time
from collections import Counter

import httpx

from conftest import ONE_PIXEL, Server, assert_error, b64, key_id, log_rows, make_key, photo_path

CLIENTS = 6
LOAD_S = 4


def post_until_stopped(url: str, key: str, stop: threading.Event, received: Counter, lock: threading.Lock) -> None:
    """Posts one image after another; counts every answer that arrived, by status. A request the server never
    answered (its connection closed or refused) is not an answer."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        while not stop.is_set():
            try:
                response = client.post("/v1/classify", json={"image": ONE_PIXEL})
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            with lock:
                received[response.status_code] += 1


def load_then_signal(server: Server, key: str, sig: signal.Signals) -> Counter:
    received: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    clients = [threading.Thread(target=post_until_stopped, args=(server.url, key, stop, received, lock))
               for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        time.sleep(LOAD_S)
        server.process.send_signal(sig)
        server.wait_exit(60)
    finally:
        stop.set()
        for client in clients:
            client.join()
    return received


def usage_after_restart(start_server, server: Server, key: str) -> dict:
    restarted = start_server(tmp=server.tmp)  # the same database file
    with restarted.client(key) as client:
        return client.get("/v1/usage").json()


def test_after_sigterm_under_load_the_usage_equals_what_the_clients_received(start_server):
    server = start_server()
    key = make_key(server.database_url, rate_limit=1_000_000)
    received = load_then_signal(server, key, signal.SIGTERM)
    assert server.process.returncode == -signal.SIGTERM
    assert received[200] > 0 and set(received) <= {200, 503}, received
    usage = usage_after_restart(start_server, server, key)
    assert (usage["total_requests"], usage["successful_requests"]) == (sum(received.values()), received[200])


def test_after_sigkill_under_load_the_log_holds_at_least_every_answer_received(start_server):
    server = start_server()
    key = make_key(server.database_url, rate_limit=1_000_000)
    received = load_then_signal(server, key, signal.SIGKILL)
    assert server.process.returncode == -signal.SIGKILL
    assert received[200] > 0
    usage = usage_after_restart(start_server, server, key)
    assert usage["total_requests"] >= sum(received.values())
    assert usage["successful_requests"] >= received[200]


def test_past_the_shutdown_timeout_queued_images_are_answered_503_and_the_server_exits(start_server):
    """256 images queued (far more than 1 s of work), SIGTERM, SHUTDOWN_TIMEOUT_S=1: every request is answered,
    the ones whose images were still queued with 503 `shutting_down`, and logged; the process exits cleanly."""
    server = start_server({"MAX_QUEUE": "256", "SHUTDOWN_TIMEOUT_S": "1"})
    key = make_key(server.database_url, rate_limit=1_000_000)
    cat = b64(photo_path("chelsea.png").read_bytes())
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as kept_open:
        assert kept_open.get("/healthz").status_code == 200

        def post() -> httpx.Response:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
                return client.post("/v1/classify", json={"images": [cat] * 16})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = [pool.submit(post) for _ in range(16)]
            database = sqlite3.connect(server.database_url.removeprefix("sqlite:///"))
            deadline = time.monotonic() + 60
            while database.execute("SELECT COUNT(*) FROM rate_limit_hits").fetchone()[0] < 256:  # all admitted
                assert time.monotonic() < deadline
                time.sleep(0.01)
            database.close()
            server.process.send_signal(signal.SIGTERM)
            try:  # a request that still reaches the server after SIGTERM joins no queue
                late = kept_open.post("/v1/classify", json={"image": ONE_PIXEL})
            except httpx.TransportError:
                late = None  # or its connection was already closed: also never queued
            responses = [future.result() for future in answers]
    if late is not None:
        assert_error(late, 503, "shutting_down")
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert assert_error(response, 503, "shutting_down") and response.headers["Retry-After"] == "1"
    assert server.wait_exit(60) == -signal.SIGTERM
    assert "queued images answered 503 unrun" in server.log()
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert sorted(row["status_code"] for row in rows) == sorted(statuses + ([503] if late is not None else []))
