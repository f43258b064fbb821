"""Bodies read at once are bounded (MAX_BODY_MEMORY_BYTES, request_body.BodyMemory): past the bound a new upload
is answered 503 before its body is read, uncounted, and the server's memory stays under the bound plus what it
held idle, however many uploads arrive together."""

import select
import socket
import threading
import time
from pathlib import Path

from test_http_protocol import error_body

from conftest import ONE_PIXEL, assert_error, key_id, log_rows, make_key, read_response

MIB = 1024 * 1024
UPLOADS = 24
BODY_BYTES = 19 * MIB  # each, under MAX_BODY_BYTES' 20 MiB
MEMORY_BOUND = 256 * MIB  # MAX_BODY_MEMORY_BYTES' default
PREFIX = b'{"image": "'


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class MemoryWatch:
    """The most the process held, sampled every 10 ms on a thread of its own."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.highest_mb = resident_mb(pid)
        self.is_stopping = False
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.is_stopping:
            self.highest_mb = max(self.highest_mb, resident_mb(self.pid))
            time.sleep(0.01)

    def stop(self) -> float:
        self.is_stopping = True
        self.thread.join()
        return self.highest_mb


def answered(sock: socket.socket, wait_s: float) -> bytes | None:
    if not select.select([sock], [], [], wait_s)[0]:
        return None
    sock.settimeout(10)
    return read_response(sock)


def test_uploads_past_the_memory_bound_are_refused_before_their_bodies_and_memory_stays_under_it(start_server):
    """24 uploads of 19 MiB held at once took the server from 1,075 to 1,678 MB, 2,048 MB as they were parsed:
    about 40 MB each, 20 GB at the defaults' 1000 connections."""
    server = start_server()
    key = make_key(server.database_url, rate_limit=1000)
    with server.client(key) as client:  # warm: the first answers allocate what every later one reuses
        for _ in range(3):
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    idle_mb = resident_mb(server.process.pid)
    watch = MemoryWatch(server.process.pid)
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {BODY_BYTES}\r\n\r\n").encode()
    body = PREFIX + b"A" * (BODY_BYTES - len(PREFIX) - 2) + b'"}'  # base64 of zeros: not an image
    reading: list[socket.socket] = []
    refusals: list[bytes] = []
    try:
        for _ in range(UPLOADS):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(head)
            refusal = answered(sock, 0.5)
            if refusal is not None:
                refusals.append(refusal)
                sock.close()
                continue
            sock.sendall(body[:-1])  # all but its last byte: held, being read
            reading.append(sock)
        time.sleep(0.5)
        for sock in reading:  # now each is parsed and decoded
            sock.sendall(body[-1:])
        for sock in reading:
            sock.settimeout(60)
            assert_error(error_body(read_response(sock)), 400, "not_an_image")
    finally:
        for sock in reading:
            sock.close()
        highest_mb = watch.stop()
    admitted = MEMORY_BOUND // (3 * BODY_BYTES)  # a body counts three times its size
    assert len(reading) == admitted and len(refusals) == UPLOADS - admitted, (len(reading), len(refusals))
    for refusal in refusals:
        response = error_body(refusal)
        assert "MAX_BODY_MEMORY_BYTES" in assert_error(response, 503, "too_many_uploads")["message"]
        assert response.headers["Retry-After"] == "1" and response.headers["Connection"] == "close"
    print(f"idle {idle_mb:.0f} MB, highest {highest_mb:.0f} MB, after {resident_mb(server.process.pid):.0f} MB")
    assert highest_mb - idle_mb < MEMORY_BOUND / MIB, (idle_mb, highest_mb)
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert sorted(row["status_code"] for row in rows) == [200] * 3 + [400] * admitted + [503] * len(refusals)
    with server.client(key) as client:
        # The room is free again, and only the requests read were counted.
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.get("/v1/usage").json()["remaining"] == 1000 - 4 - admitted
