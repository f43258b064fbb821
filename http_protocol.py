"""The HTTP/1.1 connection: uvicorn's h11 protocol, with the limits a server facing the public needs.

    $ uvicorn main:app --http http_protocol:HttpProtocol ...     (make run does; so do the tests' servers)

What it adds to uvicorn's H11Protocol, in the order a connection meets it:

    too many       past MAX_CONNECTIONS open in this process, a new connection is answered 503 and closed at
                   once, before open connections use up the process's files (uvicorn's --limit-concurrency
                   keeps each one open until its head arrives, then answers 503)
    head timeout   a request line and headers not all arrived HEADER_TIMEOUT_S after the connection opened, or
                   after its previous answer ended, get a 408 and the connection is closed (one that sent
                   nothing is just closed): uvicorn times no head, and its keep-alive timer stops at the first
                   byte, so a client sending a header line every few seconds held its connection for good
    request head   a request line and headers over MAX_HEAD_BYTES get a 431 in the one error shape, and the
                   connection is closed, however the head arrives (h11 caps only a head still arriving: one
                   of 100 KB sent in one write was served)
    early answer   an answer that starts before its request's body has all arrived (a 401, 413, 429 or 503
                   decided from the head) says `Connection: close`, and the connection is closed once it is
                   sent: the rest of the body is not wanted, and uvicorn would keep such a connection open
                   for good (body data arriving after the answer stops its keep-alive timer)
    given up       a request uvicorn cancels (--timeout-graceful-shutdown passed, or a second Ctrl-C) before
                   its answer started is closed unanswered, not given uvicorn's plain-text 500 and an ERROR line

Plain `uvicorn main:app` runs uvicorn's own protocol, without any of these.
"""

import asyncio
import contextvars
import functools
import logging
import time
from typing import Any

import h11
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from errors import ERROR_TYPES, ErrorDetail, ErrorResponse
from requestid import HEADER as REQUEST_ID_HEADER, new_request_id
from security_headers import API_HEADERS
from settings import Settings

logger = logging.getLogger("classify")

MAX_HEAD_BYTES = 16 * 1024  # request line and headers; a key and a few headers take well under 1 KiB
HEAD_END = b"\r\n\r\n"
LOG_EVERY_S = 10.0


@functools.cache
def connection_settings() -> Settings:
    """HEADER_TIMEOUT_S and MAX_CONNECTIONS, read once per process: uvicorn makes a protocol per connection."""
    return Settings()


class HttpProtocol(H11Protocol):
    """uvicorn's H11Protocol and the limits above; uvicorn makes one for each connection."""

    refused = 0  # connections refused (MAX_CONNECTIONS) since the last log line about it
    refusal_logged_at = -LOG_EVERY_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served_app = self.app
        self.app = self.serve  # what uvicorn runs for each request
        self.header_timeout_s = connection_settings().header_timeout_s
        self.max_connections = connection_settings().max_connections
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # this one included
            self.log_refusal()
            self.refuse(503, "too_many_connections", f"The server holds {self.max_connections} connections "
                        "already (MAX_CONNECTIONS); retry shortly.", {"Retry-After": "1"})
            return
        self.start_head_timer()

    @classmethod
    def log_refusal(cls) -> None:
        # One line per LOG_EVERY_S at most: a flood of connections must not become a flood of log lines.
        cls.refused += 1
        if time.monotonic() - cls.refusal_logged_at >= LOG_EVERY_S:
            logger.warning("%d connections answered 503 and closed since the last such line: MAX_CONNECTIONS "
                           "(%d) were open", cls.refused, connection_settings().max_connections)
            cls.refused, cls.refusal_logged_at = 0, time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        super().connection_lost(exc)

    def start_head_timer(self) -> None:
        self.stop_head_timer()
        # A context of its own: started as an answer ends, it would otherwise log with that request's id.
        self.head_timer = self.loop.call_later(self.header_timeout_s, self.head_timed_out,
                                               context=contextvars.Context())

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        buffered, _ = self.conn.trailing_data
        if not buffered:  # nothing sent since the connection opened, or since the last answer: just close
            self.transport.close()
            return
        logger.info("request head from %s not all in after %g s (HEADER_TIMEOUT_S): answered 408",
                    self.client, self.header_timeout_s)
        self.refuse(408, "request_head_timeout", f"The request line and headers did not all arrive within "
                    f"{self.header_timeout_s:g} s (HEADER_TIMEOUT_S); send them at once.")

    def handle_events(self) -> None:
        # Between requests h11 holds the next head unparsed; once it is complete, h11 takes it at any size.
        if self.conn.their_state is h11.IDLE and self.buffered_head_bytes() > MAX_HEAD_BYTES:
            self.refuse_head()
            return
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is in (its body is BODY_TIMEOUT_S's)
            self.stop_head_timer()

    def on_response_complete(self) -> None:
        self.start_head_timer()  # for the next head; a pipelined one already in stops it at once (handle_events)
        super().on_response_complete()

    def buffered_head_bytes(self) -> int:
        buffered, _ = self.conn.trailing_data
        end = buffered.find(HEAD_END, 0, MAX_HEAD_BYTES + len(HEAD_END))
        return len(buffered) if end < 0 else end + len(HEAD_END)

    def refuse_head(self) -> None:
        logger.warning("request head over %d bytes from %s: answered 431", MAX_HEAD_BYTES, self.client)
        self.refuse(431, "request_head_too_large", f"The request line and headers are over {MAX_HEAD_BYTES} "
                                                   "bytes; send fewer or shorter headers.")

    def refuse(self, status: int, code: str, message: str, extra_headers: dict[str, str] | None = None) -> None:
        """An error written straight to the socket (h11 sends no answer to a request it has not parsed); then close."""
        request_id = new_request_id()
        error = ErrorDetail(type=ERROR_TYPES.get(status, "invalid_request_error"), code=code, message=message,
                            request_id=request_id)
        body = ErrorResponse(error=error).model_dump_json().encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
                   REQUEST_ID_HEADER: request_id, "X-Content-Type-Options": "nosniff", **API_HEADERS,
                   **(extra_headers or {})}
        head = f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items())
        self.transport.write(head.encode("latin-1") + b"\r\n" + body)
        self.transport.close()

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = self.cycle  # this request's: the next one's starts only once this one is answered

        async def send_closing_early(message: Message) -> None:
            # more_body: h11 has not seen the body's end, so the connection cannot carry another request.
            if message["type"] == "http.response.start" and cycle.more_body:
                headers = list(message.get("headers", []))
                if CLOSE_HEADER not in headers:
                    message = {**message, "headers": headers + [CLOSE_HEADER]}
            await send(message)

        try:
            await self.served_app(scope, receive, send_closing_early)
        except asyncio.CancelledError:
            if cycle.response_started:
                raise
            # uvicorn gave up on the request: nothing the log holds may be answered now, so no answer at all.
            logger.warning("%s %s cancelled as the server exits: closed unanswered", scope["method"], scope["path"])
            cycle.disconnected = True  # uvicorn then sends nothing
            self.transport.close()
