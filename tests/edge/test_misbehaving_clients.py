"""Clients that misbehave, against the real server started as `make run` starts it (plain `uvicorn main:app`):
readers that never read, bodies that keep coming after an early answer, half-closed connections, requests with
two lengths or broken framing, heads ended by bare LFs. Each is answered as RFC 9110/9112 say, in the one error
shape, and its request-log row says what the client received (edge/protocol.py)."""

import asyncio
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_http_protocol import error_body, open_files

from client import AsyncClient, AuthenticationError
from conftest import ONE_PIXEL, ROOT, assert_error, b64, key_id, log_rows, make_key, photo, read_response, server_env
from servers import free_port

BUNDLE = b"GET /static/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n"  # 1.5 MB: more than the socket buffers hold
MAX_BODY = 5_000_000


def non_readers(port: int, count: int) -> list[socket.socket]:
    """Connections that pipeline eight requests for the 1.5 MB Swagger bundle, with a 4 KB receive buffer, and
    never read."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(BUNDLE * 8)
        sockets.append(sock)
    return sockets


def cat_jpeg() -> bytes:
    buffer = io.BytesIO()
    photo("chelsea.png").convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def healthz_status(url: str) -> int:
    return httpx.get(url + "/healthz", timeout=5).status_code


def read_until_closed(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (an error if it does not within `timeout_s`)."""
    sock.settimeout(timeout_s)
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


def test_an_answer_nobody_reads_is_abandoned_after_send_timeout_s_and_its_connection_freed(start_server):
    """50 such readers held their connections for good (all 50 still open after 55 s): a new client got 503
    too_many_connections."""
    server = start_server({"SEND_TIMEOUT_S": "2", "MAX_CONNECTIONS": "20", "HEADER_TIMEOUT_S": "3"})
    before = open_files(server.process.pid)
    sockets = non_readers(server.port, 20)
    try:
        assert healthz_status(server.url) == 503  # every connection is held
        started = time.monotonic()
        while healthz_status(server.url) != 200:
            assert time.monotonic() - started < 2 + 5, "still held"
            time.sleep(0.2)
        assert time.monotonic() - started >= 1  # not before SEND_TIMEOUT_S (less the time the first check took)
        assert open_files(server.process.pid) <= before + 2
        assert "answers abandoned and their connections aborted" in server.log()
    finally:
        for sock in sockets:
            sock.close()


def test_sigterm_exits_within_shutdown_timeout_s_whatever_readers_never_read(start_server):
    """The server was still running 45 s after SIGTERM, exiting only once such readers left."""
    server = start_server({"SEND_TIMEOUT_S": "600", "SHUTDOWN_TIMEOUT_S": "2"})
    sockets = non_readers(server.port, 20)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.wait_exit(30)
        assert time.monotonic() - started < 2 + 3
    finally:
        for sock in sockets:
            sock.close()


async def early_answers(url: str, key: str, count: int, body_bytes: int, chunked: bool = False) -> list[int]:
    """Statuses of `count` POSTs to /v1/classify with a body of `body_bytes`, through httpx.AsyncClient, which
    writes the whole body before it reads: a connection closed on it at once makes the answer a reset."""
    body = b"A" * body_bytes

    async def stream() -> object:
        for at in range(0, body_bytes, 65536):
            yield body[at:at + 65536]

    statuses = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(count):
            response = await client.post("/v1/classify", content=stream() if chunked else body,
                                         headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"})
            assert_error(response, response.status_code)
            statuses.append(response.status_code)
    return statuses


def hold_an_upload(port: int, key: str) -> socket.socket:
    """A connection whose MAX_BODY-byte body is on its way (half of it sent): its room is taken."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {MAX_BODY}\r\n\r\n").encode() + b"A" * (MAX_BODY // 2))
    return sock


EARLY_ANSWERS = {  # case: (settings, status, code)
    "401 for the key": ({}, 401, "invalid_api_key"),
    "413 declared": ({}, 413, "body_too_large"),
    "413 streamed": ({}, 413, "body_too_large"),
    "429 seen full": ({}, 429, "rate_limit_exceeded"),
    "503 too_many_connections": ({"MAX_CONNECTIONS": "1"}, 503, "too_many_connections"),
    "503 too_many_uploads": ({"MAX_BODY_MEMORY_BYTES": str(3 * MAX_BODY)}, 503, "too_many_uploads"),
}


@pytest.mark.parametrize("case", EARLY_ANSWERS)
def test_every_early_answer_reaches_httpx_async_client_whole(start_server, case):
    """httpx.AsyncClient got a ReadError for 20 of 20 401s before a 4.8 MB body, 3 of 3 413s, 10 of 10 503s at
    MAX_CONNECTIONS: the kernel's reset, for body bytes arriving on a closed socket, destroyed the answer."""
    settings, status, code = EARLY_ANSWERS[case]
    server = start_server({"MAX_BODY_BYTES": str(MAX_BODY), **settings})
    key = make_key(server.database_url, rate_limit=1 if status == 429 else 1000)
    held: list[socket.socket] = []
    if status == 429:
        with server.client(key) as client:
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 429  # now known full
    elif code == "too_many_connections":
        held.append(socket.create_connection(("127.0.0.1", server.port)))  # the one connection allowed
    elif code == "too_many_uploads":
        held.append(hold_an_upload(server.port, key))
        time.sleep(0.3)
    try:
        body_bytes = MAX_BODY + 1 if code == "body_too_large" else MAX_BODY
        used_key = "sk-not-a-key" if status == 401 else key
        statuses = asyncio.run(early_answers(server.url, used_key, 5, body_bytes, chunked=case == "413 streamed"))
    finally:
        for sock in held:
            sock.close()
    assert statuses == [status] * 5


def test_our_async_client_reads_a_401_before_its_upload_and_does_not_retry_it(start_server):
    """With a wrong key our AsyncClient uploaded 5 MB three times and raised ServerUnreachable."""
    server = start_server({"MAX_BODY_BYTES": str(2 * MAX_BODY)})
    upload = b"\xff\xd8\xff" + os.urandom(MAX_BODY)  # what an upload looks like: a big file's bytes

    async def classify() -> None:
        async with AsyncClient(server.url, "sk-not-a-key") as client:
            await client.classify(upload)

    with pytest.raises(AuthenticationError):
        asyncio.run(classify())
    rows = log_rows(server.database_url, "endpoint = '/v1/classify'")
    assert [row["status_code"] for row in rows] == [401]  # asked once


def test_under_overload_every_client_gets_an_answer_and_the_log_holds_exactly_those(start_server):
    """MAX_QUEUE=16, requests of 1 to 16 images at once: the log held 566 `503 overloaded` rows while clients got
    478 answers and 88 resets."""
    server = start_server({"MAX_QUEUE": "16"})
    key = make_key(server.database_url, rate_limit=100_000)
    cat = b64(cat_jpeg())
    random.seed(24)
    counts = [random.randint(1, 16) for _ in range(96)]

    async def post_all() -> tuple[Counter, int]:
        received: Counter = Counter()
        failures = 0
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     limits=httpx.Limits(max_connections=16)) as client:
            async def post(count: int) -> None:
                nonlocal failures
                try:
                    response = await client.post("/v1/classify", json={"images": [cat] * count})
                except httpx.TransportError:
                    failures += 1
                    return
                received[response.status_code] += 1
            await asyncio.gather(*(post(count) for count in counts))
        return received, failures

    received, failures = asyncio.run(post_all())
    assert failures == 0
    assert received[503] > 0 and received[200] > 0, received  # it was overloaded, and it served
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert Counter(row["status_code"] for row in rows) == received


def test_a_request_with_content_length_and_transfer_encoding_is_answered_then_its_connection_closed(server):
    """RFC 9112 section 6.1: the server MUST close after answering it. Kept open, a request smuggled in its body
    was served: a 405, then /v1/models' 200, on one connection."""
    key = make_key(server.database_url)
    smuggled = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall((f"POST /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Length: {5 + len(smuggled)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                     + b"0\r\n\r\n" + smuggled)
        received = read_until_closed(sock)
    assert received.count(b"HTTP/1.1 ") == 1, received
    response = error_body(received)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Connection"] == "close"
    rows = log_rows(server.database_url, "request_id = :id", id=response.headers["X-Request-ID"])
    assert [row["status_code"] for row in rows] == [405]
    assert not log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))  # smuggled


@pytest.mark.parametrize("request_head, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n", 400),
    (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
])
def test_a_request_h11_refuses_gets_the_one_error_shape(server, request_head, status):
    """It got uvicorn's plain text "Invalid HTTP request received.", without X-Request-ID or nosniff."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request_head)
        response = error_body(read_until_closed(sock))
    assert "valid HTTP/1.1" in assert_error(response, status, "invalid_http")["message"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Connection"] == "close"


def chunked_with_a_bad_chunk(method: str, path: str, key: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode() + b"5\r\n{\"ima\r\nZZ\r\nge\": 1}\r\n0\r\n\r\n"


def test_a_body_whose_chunks_break_is_a_400_logged_as_such_and_not_counted(server):
    """It was answered uvicorn's plain 400 but logged `499 client_closed_request`, and charged."""
    key = make_key(server.database_url, rate_limit=1000)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(chunked_with_a_bad_chunk("POST", "/v1/classify", key))
        response = error_body(read_until_closed(sock))
    assert "not valid HTTP/1.1" in assert_error(response, 400, "invalid_http")["message"]
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert [(row["status_code"], row["error_code"]) for row in rows] == [(400, "invalid_http")]
    with server.client(key) as client:
        assert client.get("/v1/usage").json()["remaining"] == 1000  # never admitted, so not counted


@pytest.mark.parametrize("path", ["/v1/usage", "/v1/models"])
def test_a_broken_body_on_a_route_that_reads_none_gets_that_routes_answer_and_its_row(server, path):
    """The row said 200 where the client got uvicorn's 400."""
    key = make_key(server.database_url)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(chunked_with_a_bad_chunk("GET", path, key))
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200 ") and received.count(b"HTTP/1.1 ") == 1, received
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert [row["status_code"] for row in rows] == [200]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/classify"])
def test_a_half_closed_client_is_answered(server, path):
    """RFC 9112 section 9.6: a client may shut its sending side once its request is sent; it got nothing, and the
    classify was logged 499 and charged."""
    key = make_key(server.database_url, rate_limit=1000)
    if path == "/v1/models":
        request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    else:
        body = f'{{"image": "{b64(cat_jpeg())}"}}'.encode()
        request = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = read_until_closed(sock)
    # An interim 100 first, which tells a half-close from a client that has gone (that one's socket resets)
    assert received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), received[:300]
    assert received.endswith(b"}")  # the whole answer, then the server's close
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert [row["status_code"] for row in rows] == [200]
    with server.client(key) as client:
        assert client.get("/v1/usage").json()["remaining"] == (999 if path == "/v1/classify" else 1000)


def test_a_head_ended_by_bare_lfs_is_measured_as_h11_reads_it(server):
    """A 159-byte LF-only head and its 320 KB body in one write got a 431, and so did 600 pipelined LF-only GETs:
    the head's end was looked for as CRLF CRLF alone."""
    key = make_key(server.database_url)
    body = f'{{"image": "{b64(Image.new("RGB", (400, 400)).tobytes()[:240_000])}"}}'.encode()
    head = (f"POST /v1/classify HTTP/1.1\nHost: x\nAuthorization: Bearer {key}\nContent-Type: application/json\n"
            f"Content-Length: {len(body)}\n\n").encode()
    assert len(body) > 320_000
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        answer = error_body(read_response(sock))
    assert_error(answer, 400, "not_an_image")  # read whole, and judged on what it holds
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\nHost: x\n\n" * 600)
        sock.settimeout(10)
        received = b""
        while received.count(b"HTTP/1.1 200 ") < 600:
            data = sock.recv(65536)
            assert data, received[-500:]
            received += data
    assert b"HTTP/1.1 431" not in received


def started_by_hand(tmp, how: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    code = {"uvicorn.run()": f"import uvicorn; uvicorn.run('main:app', port={port})",
            "uvicorn main:app --workers 2": None}[how]
    command = ([sys.executable, "-c", code] if code else
               [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port), "--workers", "2"])
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **server_env(tmp)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.mark.parametrize("how", ["uvicorn.run()", "uvicorn main:app --workers 2"])
def test_however_uvicorn_is_started_the_connection_limits_hold(tmp_path, how):
    """Plain `uvicorn main:app`, what every FastAPI tutorial types, ran with none of the limits and said nothing.
    (The tests' own servers are started that way: every test of edge/protocol.py runs it so.)"""
    process, port = started_by_hand(tmp_path, how)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
            response = error_body(read_until_closed(sock))
        assert_error(response, 431, "request_head_too_large")
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz")
        assert answer.status_code == 200 and "server" not in answer.headers
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def test_served_by_another_server_the_start_says_the_limits_are_missing(tmp_path):
    """The app's lifespan run without uvicorn (as another ASGI server would run it): one WARNING line says so."""
    script = ("import asyncio, main\n"
              "async def run():\n"
              "    events = asyncio.Queue()\n"
              "    for event in ('lifespan.startup', 'lifespan.shutdown'): events.put_nowait({'type': event})\n"
              "    async def send(message): print(message['type'], flush=True)\n"
              "    await main.app({'type': 'lifespan', 'asgi': {'version': '3.0'}, 'state': {}}, events.get, send)\n"
              "asyncio.run(run())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **server_env(tmp_path)})
    output = done.stdout + done.stderr
    assert "lifespan.startup.complete" in output and "lifespan.shutdown.complete" in output, output
    warnings = [line for line in output.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "not started by uvicorn" in warnings[0] and "uvicorn main:app" in warnings[0]


# Found by a hostile review of the above.

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def send_queue(server_port: int, client_port: int) -> int | None:
    """The bytes the kernel holds unsent on the server's end of one connection (/proc/net/tcp's tx_queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(fields[4].split(":")[0], 16)
    return None


def stalled(port: int, answers_bytes: int) -> socket.socket:
    """A connection, with a 4 KB receive buffer, that asked for `answers_bytes` of /healthz answers and reads none;
    returned once the server has written all it can."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(HEALTHZ * (answers_bytes // len(healthz_answer(port))))
    last = None
    while (queued := send_queue(port, sock.getsockname()[1])) != last:
        last = queued
        time.sleep(0.5)
    return sock


def healthz_answer(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(HEALTHZ)
        return read_response(sock)


@pytest.mark.parametrize("then", ["half-closes", "sends part of a head", "goes quiet"])
def test_a_connection_the_kernel_cannot_flush_is_closed_within_send_timeout_s(start_server, then):
    """With the kernel's send queue full and under 64 KiB more held by the server (so the transport never paused
    writing), a close left the connection waiting to flush for good: after the client's FIN (its socket still in
    CLOSE-WAIT 60 s later, and SIGTERM then waited out SHUTDOWN_TIMEOUT_S + 5 s), after a 408, after the head
    timeout's quiet close."""
    server = start_server({"SEND_TIMEOUT_S": "2", "HEADER_TIMEOUT_S": "3"})
    probe = stalled(server.port, 8_000_000)  # far more than the kernel holds: what it holds is its capacity
    capacity = send_queue(server.port, probe.getsockname()[1])
    probe.close()
    time.sleep(2.5)  # the probe's stalled answer is abandoned after SEND_TIMEOUT_S
    before = open_files(server.process.pid)
    sock = stalled(server.port, capacity + 32 * 1024)
    try:
        if then == "half-closes":
            sock.shutdown(socket.SHUT_WR)
        elif then == "sends part of a head":
            sock.sendall(b"GET /healthz HT")
        started = time.monotonic()
        while open_files(server.process.pid) > before:
            assert time.monotonic() - started < 3 + 2 + 3, "the connection is still held"
            time.sleep(0.2)
    finally:
        sock.close()


def test_a_broken_chunked_body_on_a_file_answer_gets_the_whole_file_and_no_traceback(server):
    """Starlette's file answers read on to watch for a hang-up: the broken body was raised there, after the answer
    had started, so the page's 1865 bytes were cut to 0 and an ERROR with a traceback was logged."""
    page = httpx.get(server.url + "/").content
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n")
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(page), received[:300]
    assert "Traceback" not in server.log()


def test_bodies_declared_but_not_sent_take_no_room(start_server):
    """Room was taken from Content-Length before any byte came: five connections declaring 20 MiB each and
    sending nothing shut out every upload for BODY_TIMEOUT_S, again and again, with one key."""
    server = start_server()
    key = make_key(server.database_url)
    mib = 1024 * 1024
    lengths = [20 * mib] * 4 + [(256 * mib - 4 * 3 * 20 * mib) // 3]  # together, three times them: all the room
    declared = []
    try:
        for length in lengths:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall((f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode())
            declared.append(sock)
        time.sleep(0.5)
        with server.client(key) as client:
            assert client.post("/v1/classify", json={"image": b64(cat_jpeg())}).status_code == 200
    finally:
        for sock in declared:
            sock.close()


def test_a_body_in_tiny_pieces_is_refused_before_it_costs_the_event_loop_much(server):
    """h11 and uvicorn spend microseconds of the one event loop on each piece of a body: 20 x 256 KB of 1-byte
    chunks cost 2.7 s of it (a probe waited 2.3 s), a 20 MiB body of them would cost minutes."""
    key = make_key(server.database_url)
    tiny_chunks = b"1\r\na\r\n" * 50_000
    for path, status, code in [("/v1/classify", 400, "invalid_http"), ("/healthz", 405, "method_not_allowed")]:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                          "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
            sock.sendall(tiny_chunks)
            response = error_body(read_until_closed(sock))
        error = assert_error(response, status, code)
        if status == 400:
            assert "pieces averaging under 256 bytes" in error["message"]
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert [(row["status_code"], row["error_code"]) for row in rows] == [(400, "invalid_http")]


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 17_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
], ids=["not HTTP", "head over 16 KiB", "an upgrade"])
def test_a_flood_of_bad_requests_is_a_few_log_lines(start_server, request_bytes):
    """Each was one or two lines of the server's log (uvicorn's and ours): 200 requests, 400 lines."""
    server = start_server()
    lines_before = len(server.log().splitlines())
    for _ in range(100):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
    assert len(server.log().splitlines()) - lines_before <= 3  # a summary or two
    assert "Invalid HTTP request received" not in server.log() and "Unsupported upgrade" not in server.log()
