"""Slow clients against the real server (edge/protocol.py, as `make run` serves): connections whose request head
trickles in are closed HEADER_TIMEOUT_S after they opened (or after their last answer) while everyone else is
served as usual; past MAX_CONNECTIONS a new connection is answered 503 and closed at once."""

import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from test_http_protocol import error_body, is_closed_by_server, open_files

from conftest import ONE_PIXEL, Server, assert_error, make_key, read_response, server_env

HEADER_TIMEOUT_S = 6
FRESH, KEPT_ALIVE = 250, 50  # slow connections: new ones, and ones that were answered once first
LINE_EVERY_S = 2  # each slow connection sends one more header line this often
SLACK_S = 5  # a busy, shared machine: closed within this long after the timeout


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("slow")
    running = Server(tmp, server_env(tmp, HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S))).start()
    yield running
    running.stop()


class SlowClients:
    """Connections that send a request head one header line every LINE_EVERY_S, never finishing it; a thread of
    its own records when the server closes each, and what it answered."""

    def __init__(self, port: int, fresh: int, kept_alive: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.started: dict[socket.socket, float] = {}  # when each one's head began: its timer's start
        self.closed: dict[socket.socket, float] = {}
        self.answers: dict[socket.socket, bytes] = {}
        self.is_stopping = False
        for _ in range(kept_alive):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200 "), "the first request is answered"
            self.begin(sock)
        for _ in range(fresh):
            self.begin(socket.create_connection(("127.0.0.1", port), timeout=30))
        self.thread = threading.Thread(target=self.trickle, daemon=True)
        self.thread.start()

    def begin(self, sock: socket.socket) -> None:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        self.started[sock] = time.monotonic()
        self.answers[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ)

    def trickle(self) -> None:
        next_line = time.monotonic() + LINE_EVERY_S
        while not self.is_stopping and len(self.closed) < len(self.started):
            for key, _ in self.selector.select(timeout=0.05):
                self.read(key.fileobj)  # type: ignore[arg-type]
            if time.monotonic() >= next_line:
                for sock in set(self.started) - set(self.closed):
                    try:
                        sock.send(b"X-Slowly: one more line\r\n")
                    except OSError:
                        self.close(sock)
                next_line += LINE_EVERY_S

    def read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.answers[sock] += data
        else:
            self.close(sock)

    def close(self, sock: socket.socket) -> None:
        if sock not in self.closed:
            self.closed[sock] = time.monotonic()
            self.selector.unregister(sock)
            sock.close()

    def open_after(self, seconds: float) -> int:
        return sum(1 for sock, started in self.started.items()
                   if self.closed.get(sock, float("inf")) > started + seconds)

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)

    def remove(self) -> None:
        self.is_stopping = True
        self.thread.join(5)
        for sock in set(self.started) - set(self.closed):
            sock.close()


def classify_latencies(url: str, key: str, count: int) -> list[float]:
    """`count` requests one after another, each on a new connection, as a new client's would be."""
    latencies = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(count):
            started = time.monotonic()
            response = client.post("/v1/classify", json={"image": ONE_PIXEL})
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
    return latencies


def test_slow_request_heads_are_closed_after_the_timeout_while_others_are_served(slow_server):
    """Before: uvicorn times no request head, and its keep-alive timer stops at the first byte, so all 300 were
    still open (and holding a file each) for as long as they kept sending."""
    key = make_key(slow_server.database_url)
    classify_latencies(slow_server.url, key, 3)  # warm
    before = statistics.median(classify_latencies(slow_server.url, key, 15))
    files_before = open_files(slow_server.process.pid)
    slow = SlowClients(slow_server.port, FRESH, KEPT_ALIVE)
    try:
        during = statistics.median(classify_latencies(slow_server.url, key, 15))
        held = len(slow.started) - len(slow.closed)
        files_held = open_files(slow_server.process.pid)
        slow.wait(HEADER_TIMEOUT_S + SLACK_S + LINE_EVERY_S)
        assert held == FRESH + KEPT_ALIVE and files_held >= files_before + held - 5  # all were in, and held
        assert slow.open_after(HEADER_TIMEOUT_S - 1) == FRESH + KEPT_ALIVE, "none is closed before its time"
        still_open = slow.open_after(HEADER_TIMEOUT_S + SLACK_S)
        assert still_open == 0, f"{still_open} of {FRESH + KEPT_ALIVE} still open {HEADER_TIMEOUT_S + SLACK_S} s on"
        for answer in slow.answers.values():  # a head begun and not finished: told why, in the one error shape
            assert_error(error_body(answer), 408, "request_head_timeout")
        assert during < 5 * before + 0.5, (before, during)  # a generous bound: the machine is shared
        assert open_files(slow_server.process.pid) <= files_before + 5
    finally:
        slow.remove()
    print(f"median classify latency: {before * 1000:.1f} ms alone, {during * 1000:.1f} ms beside "
          f"{FRESH + KEPT_ALIVE} slow connections; all closed after {HEADER_TIMEOUT_S} to "
          f"{max(slow.closed[s] - slow.started[s] for s in slow.closed):.1f} s")


def test_a_head_in_time_is_served_and_each_answer_restarts_the_timer(slow_server):
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=30) as sock:
        for line in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slowly: yes\r\n", b"\r\n"):
            sock.sendall(line)
            time.sleep(HEADER_TIMEOUT_S / 5)  # the whole head within 4/5 of the timeout
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        for _ in range(2):  # the connection lives on past the timeout: each head is timed from the last answer
            time.sleep(HEADER_TIMEOUT_S / 2)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(slow_server):
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=HEADER_TIMEOUT_S + SLACK_S) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b"" and HEADER_TIMEOUT_S - 1 < time.monotonic() - started


def test_past_max_connections_new_ones_are_answered_503_and_closed_at_once(start_server):
    """Before: every connection was taken and held (uvicorn's --limit-concurrency answers 503 only once a head
    arrives, so silent connections are held too), one open file each, until the process had none left."""
    limit = 20
    running = start_server({"MAX_CONNECTIONS": str(limit), "HEADER_TIMEOUT_S": "60"})
    key = make_key(running.database_url)
    files_before = open_files(running.process.pid)
    idle = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(limit)]
    try:
        time.sleep(0.5)
        assert not any(is_closed_by_server(sock, 0.01) for sock in idle)
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as extra:
                started = time.monotonic()
                response = error_body(read_response(extra))
                assert_error(response, 503, "too_many_connections")
                assert response.headers["Retry-After"] == "1" and response.headers["Connection"] == "close"
                assert is_closed_by_server(extra, 2) and time.monotonic() - started < 2
        assert open_files(running.process.pid) <= files_before + limit + 5
        with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            assert_error(client.get("/v1/models"), 503, "too_many_connections")
            idle.pop().close()
            time.sleep(0.5)
            assert client.get("/v1/models").status_code == 200  # a place is free again
    finally:
        for sock in idle:
            sock.close()
    assert "connections answered 503 and closed" in running.log()
