"""The books across stops: every answer a client got is in the log after SIGTERM (exactly) and after SIGKILL
(at least); SIGTERM answers what it admitted, and past SHUTDOWN_TIMEOUT_S answers the rest 503, then exits."""

import concurrent.futures
import signal
import socket
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


def start_upload(server: Server, key: str) -> socket.socket:
    """A classify request whose head and first kilobyte have arrived; the rest never comes."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall((f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode() + b'{"image": "' + b"A" * 1000)
    return sock


def answer_of(sock: socket.socket) -> tuple[httpx.Response, float]:
    """The answer on `sock` (the server closes the connection after it), and when it came (time.monotonic())."""
    answer = b""
    while data := sock.recv(65536):
        answer += data
    arrived = time.monotonic()
    head, body = answer.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body), arrived


def assert_answered_shutting_down(server: Server, key: str, response: httpx.Response) -> None:
    assert_error(response, 503, "shutting_down")
    assert response.headers["Connection"] == "close" and response.headers["Retry-After"] == "1"
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert [(row["status_code"], row["error_code"]) for row in rows] == [(503, "shutting_down")]
    assert [row["request_id"] for row in rows] == [response.headers["X-Request-ID"]]


def test_an_upload_in_progress_at_sigterm_is_answered_503_by_the_shutdown_deadline_and_logged(start_server):
    """It got uvicorn's plain-text 500 when --timeout-graceful-shutdown ran out, and no row."""
    server = start_server({"SHUTDOWN_TIMEOUT_S": "2"}, args=("--timeout-graceful-shutdown", "4"))
    key = make_key(server.database_url)
    with start_upload(server, key) as sock:
        time.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        response, arrived = answer_of(sock)
    assert 1.5 < arrived - signalled < 3.5, (response, response.text)  # at the deadline, before uvicorn gives up
    assert server.wait_exit(30) == -signal.SIGTERM
    assert_answered_shutting_down(server, key, response)
    assert " ERROR " not in server.log() and "Traceback" not in server.log()


def test_a_second_ctrl_c_answers_an_upload_in_progress_503_at_once_and_logs_it(start_server):
    """The second Ctrl-C makes uvicorn stop waiting: what is still arriving is answered and logged first."""
    server = start_server(args=("--timeout-graceful-shutdown", "25"))  # SHUTDOWN_TIMEOUT_S: 20
    key = make_key(server.database_url)
    with start_upload(server, key) as sock:
        time.sleep(0.3)
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        response, arrived = answer_of(sock)
    assert arrived - signalled < 1.5, (response, response.text)
    server.wait_exit(30)
    assert_answered_shutting_down(server, key, response)
    assert "Traceback" not in server.log()


def test_a_request_uvicorn_gives_up_on_is_closed_unanswered_not_given_a_plain_500(start_server):
    """--timeout-graceful-shutdown under SHUTDOWN_TIMEOUT_S (a misconfiguration): uvicorn cancels the upload
    first. An answer now could not be logged, so there is none: no plain-text 500, no traceback."""
    server = start_server(args=("--timeout-graceful-shutdown", "1"))
    key = make_key(server.database_url)
    with start_upload(server, key) as sock:
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        received = b""
        while data := sock.recv(65536):
            received += data
    assert received == b""
    assert server.wait_exit(30) == -signal.SIGTERM
    assert "closed unanswered" in server.log()
    assert "Exception in ASGI application" not in server.log() and "Traceback" not in server.log()
    assert log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key)) == []
