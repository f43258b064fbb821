"""The HTTP/1.1 connection: uvicorn's h11 protocol, with the limits a server facing the public needs.

However the app is started (`uvicorn main:app`, `make run`, `--workers N`), its start-up makes the uvicorn
serving it use `HttpProtocol` for every connection (serving.py). What it adds to uvicorn's H11Protocol, in
the order a connection meets it:

    too many       past MAX_CONNECTIONS open in this process, a new connection is answered 503 and closed,
                   before open connections use up the process's files (uvicorn's --limit-concurrency keeps
                   each one open until its head arrives, then answers 503)
    head timeout   a request line and headers not all arrived HEADER_TIMEOUT_S after the connection opened, or
                   after its previous answer ended, get a 408 and the connection is closed (one that sent
                   nothing is just closed): uvicorn times no head, and its keep-alive timer stops at the first
                   byte, so a client sending a header line every few seconds held its connection for good
    request head   a request line and headers over MAX_HEAD_BYTES get a 431, however the head arrives (h11
                   caps only a head still arriving: one of 100 KB sent in one write was served); a head ends
                   at its first blank line, bare LFs included, as h11 reads it
    not HTTP       what h11 refuses gets h11's status (400; 501 for a Transfer-Encoding it does not know) in the
                   one error shape, not uvicorn's plain text; a body whose framing breaks mid-way (a bad chunk, or
                   too many tiny ones) is the app's to answer: its reader is told (BODY_ERROR), and answers a 400
                   the request log records
    both lengths   a request with Content-Length and Transfer-Encoding is read by its Transfer-Encoding (h11
                   does) and the connection is closed after its answer (RFC 9112 section 6.1), so nothing
                   smuggled after its body is served
    half-close     a client that shuts its sending side once its request is in (RFC 9112 section 9.6) is
                   answered, then the connection closed; one that does so mid-body has gone
    early answer   an answer that starts before its request's body has all arrived (a 401, 413, 429 or 503
                   decided from the head) says `Connection: close`, and the connection is closed once it is
                   sent: the rest of the body is not wanted
    stalled reader an answer that cannot be written because the client reads none of it for SEND_TIMEOUT_S
                   is abandoned and the connection aborted (at shutdown, by SHUTDOWN_TIMEOUT_S): otherwise it
                   holds its connection, and the server's exit, for as long as the client likes
    closing        a connection the client may still be sending on is closed in stages (RFC 9112 section
                   9.6): the answer, then our side's FIN, then whatever the client still sends is read and
                   discarded until it closes too, for at most BODY_TIMEOUT_S and MAX_BODY_BYTES. Closed at
                   once, the kernel answers the client's next bytes with a reset, which destroys the answer
                   before a client that writes its whole body first (httpx's AsyncClient) has read it
    given up       a request uvicorn cancels (--timeout-graceful-shutdown passed, or a second Ctrl-C) before
                   its answer started is closed unanswered, not given uvicorn's plain-text 500 and an ERROR line
"""

import asyncio
import contextvars
import functools
import logging
import re
import socket
import sys
from typing import Any

import h11
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol, RequestResponseCycle

from edge.security_headers import API_HEADERS
from operations.errors import ERROR_TYPES, ErrorDetail, ErrorResponse, clipped
from operations.logs import LogSummary
from operations.request_ids import HEADER as REQUEST_ID_HEADER, new_request_id
from settings import Settings

logger = logging.getLogger("classify")

MAX_HEAD_BYTES = 16 * 1024  # request line and headers; a key and a few headers take well under 1 KiB
HEAD_END = re.compile(rb"\n\r?\n")  # h11's own rule for where a head ends
# A closing connection is read until the client has sent nothing for this long (Apache's lingering close waits
# 2 s a read): a client still writing its body sends more often.
LINGER_QUIET_S = 2.0
# h11 and uvicorn spend 3.5-7 us of the event loop on each piece of a body (a chunk, or what one read brought):
# past FREE_BODY_PIECES, a body whose pieces average under MIN_MEAN_PIECE_BYTES is refused as broken framing
# (20 x 256 KB of 1-byte chunks cost 2.7 s of the loop; a 20 MiB body of them would cost minutes).
FREE_BODY_PIECES = 1000
MIN_MEAN_PIECE_BYTES = 256
RESET_CHECK_S = 0.1  # how soon a client that closed as its images wait is noticed (they are then not run)
BODY_ERROR = "classify.body_error"  # in a request's body message: why its framing broke (HTTP/1.1's words)
# Connections refused at MAX_CONNECTIONS are over the cap already: this many at most linger, the rest close at once.
MAX_REFUSED_LINGERING = 64


@functools.cache
def environment_settings() -> Settings:
    """The limits when no app has set them (serving.py): read once per process from the environment."""
    return Settings()


REFUSALS = LogSummary("%d connections answered 503 and closed since the last such line: MAX_CONNECTIONS (%d) were "
                      "open")
ABANDONED = LogSummary("%d answers abandoned and their connections aborted since the last such line: the client "
                       "read none of it for SEND_TIMEOUT_S (%g s), or by the shutdown deadline")
SLOW_HEADS = LogSummary("%d request heads not all in after HEADER_TIMEOUT_S (%g s) answered 408 since the last such "
                        "line", logging.INFO)
LARGE_HEADS = LogSummary("%d request heads over %d bytes answered 431 since the last such line")
NOT_HTTP = LogSummary("%d requests that are not HTTP/1.1 answered 400 or 501 since the last such line (the last: %s)")
UPGRADES = LogSummary("%d requests to upgrade the connection (a WebSocket's) answered as plain HTTP since the last "
                      "such line", logging.INFO)
# uvicorn's own warnings about what a client sent, once per request: summarised above instead
UVICORN_CLIENT_WARNINGS = {"Invalid HTTP request received.": None, "Unsupported upgrade request.": UPGRADES}


class UvicornLog(logging.LoggerAdapter):
    """uvicorn's logger as the protocol uses it, less its warnings about what a client sent (uvicorn logs one or two
    for each such request; the summaries above count them)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("uvicorn.error"), {})

    @property
    def level(self) -> int:  # uvicorn reads it to decide on its TRACE lines
        return self.logger.level

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        if msg in UVICORN_CLIENT_WARNINGS:
            if (summary := UVICORN_CLIENT_WARNINGS[msg]) is not None:
                summary.add()
        elif str(msg).startswith("No supported WebSocket library"):
            pass  # uvicorn's second line about the same request
        else:
            self.logger.warning(msg, *args, **kwargs)


def has_both_lengths(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {name for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names


class ClosedInStages:
    """The connection's transport, as uvicorn's code holds it: its close() is the protocol's close in stages."""

    def __init__(self, transport: asyncio.Transport, protocol: "HttpProtocol") -> None:
        self.transport = transport
        self.protocol = protocol

    def close(self) -> None:
        self.protocol.close_in_stages()

    def is_closing(self) -> bool:
        return self.protocol.is_lingering or self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HttpProtocol(H11Protocol):
    """uvicorn's H11Protocol and the limits above; uvicorn makes one for each connection."""

    settings: Settings | None = None  # the app's, once it has started
    refused_lingering = 0  # refused connections being closed in stages now

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = UvicornLog()  # type: ignore[assignment]
        self.served_app = self.app
        self.app = self.serve  # what uvicorn runs for each request
        settings = self.settings or environment_settings()
        self.header_timeout_s = settings.header_timeout_s
        self.max_connections = settings.max_connections
        self.send_timeout_s = settings.send_timeout_s
        self.shutdown_timeout_s = settings.shutdown_timeout_s
        self.linger_max_s = settings.body_timeout_s
        self.linger_max_bytes = settings.max_body_bytes + MAX_HEAD_BYTES
        self.raw_transport: asyncio.Transport = None  # type: ignore[assignment]
        self.head_timer: asyncio.TimerHandle | None = None
        self.send_timer: asyncio.TimerHandle | None = None  # runs while an answer waits for the client to read
        self.send_deadline: float | None = None  # the loop's time by which any answer is abandoned (shutdown)
        self.linger_timer: asyncio.TimerHandle | None = None
        self.linger_ends_at = 0.0
        self.linger_bytes_left = 0
        self.is_lingering = False
        self.is_refused = False
        self.has_peer_eof = False
        self.broken_cycle: RequestResponseCycle | None = None  # the request whose body broke its framing
        self.broken_reason = ""
        self.body_pieces = self.body_bytes = 0
        self.conn.next_event = self.next_event  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.raw_transport = transport
        self.transport = ClosedInStages(transport, self)  # type: ignore[assignment]  (and every cycle's)
        if len(self.connections) > self.max_connections:  # this one included
            REFUSALS.add(self.max_connections)
            self.is_refused = True
            self.refuse(503, "too_many_connections", f"The server holds {self.max_connections} connections "
                        "already (MAX_CONNECTIONS); retry shortly.", {"Retry-After": "1"})
            return
        self.start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        self.stop_send_timer()
        self.stop_lingering()
        super().connection_lost(exc)

    # Request heads: their size and their time.

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
            self.close_now()
            return
        SLOW_HEADS.add(self.header_timeout_s)
        # Closed at once: lingering would give a client that trickles its head longer than HEADER_TIMEOUT_S.
        self.refuse(408, "request_head_timeout", f"The request line and headers did not all arrive within "
                    f"{self.header_timeout_s:g} s (HEADER_TIMEOUT_S); send them at once.", is_lingering=False)

    def data_received(self, data: bytes) -> None:
        if self.is_lingering:
            self.discard(len(data))
        elif self.broken_cycle is None and self.conn.their_state is not h11.ERROR:  # after that, nothing is HTTP
            super().data_received(data)

    def next_event(self) -> Any:
        """h11's next event, as uvicorn asks for them; a body in too many small pieces is an error of its framing."""
        event = h11.Connection.next_event(self.conn)
        if type(event) is h11.Data:
            self.body_pieces += 1
            self.body_bytes += len(event.data)
            if self.body_pieces > FREE_BODY_PIECES and self.body_bytes < MIN_MEAN_PIECE_BYTES * self.body_pieces:
                raise h11.RemoteProtocolError(f"a body in {self.body_pieces} pieces averaging under "
                                              f"{MIN_MEAN_PIECE_BYTES} bytes; send it in larger chunks")
        elif type(event) is h11.Request:
            self.body_pieces = self.body_bytes = 0
        return event

    def handle_events(self) -> None:
        # Between requests h11 holds the next head unparsed; once it is complete, h11 takes it at any size.
        if self.conn.their_state is h11.IDLE and self.buffered_head_bytes() > MAX_HEAD_BYTES:
            self.refuse_head()
            return
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is in (its body is BODY_TIMEOUT_S's)
            self.stop_head_timer()

    def buffered_head_bytes(self) -> int:
        buffered, _ = self.conn.trailing_data
        end = HEAD_END.search(buffered, 0, MAX_HEAD_BYTES + 3)
        return len(buffered) if end is None else end.end()

    def refuse_head(self) -> None:
        LARGE_HEADS.add(MAX_HEAD_BYTES)
        self.refuse(431, "request_head_too_large", f"The request line and headers are over {MAX_HEAD_BYTES} "
                                                   "bytes; send fewer or shorter headers.")

    def send_400_response(self, msg: str) -> None:
        """What h11 refused: a head, answered here; or the body of the request being served, the app's to answer."""
        # uvicorn calls this from its `except h11.RemoteProtocolError:`, so that error is the one being handled.
        error = sys.exc_info()[1]
        reason = clipped(str(error) or msg)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # h11 holds a next request unparsed until this one is answered: what broke is this request's body.
            logger.debug("request body from %s broke HTTP/1.1's framing (%s): the connection closes after the "
                         "answer", self.client, reason)
            self.broken_cycle, self.broken_reason = cycle, reason
            cycle.keep_alive = False
            cycle.message_event.set()  # a read waiting for the body is told now (BODY_ERROR)
            return
        status = getattr(error, "error_status_hint", 400)
        NOT_HTTP.add(reason)
        self.refuse(status, "invalid_http", f"The request is not valid HTTP/1.1 ({reason}); let your HTTP library "
                                            "write it.")

    def refuse(self, status: int, code: str, message: str, extra_headers: dict[str, str] | None = None,
               is_lingering: bool = True) -> None:
        """An error written straight to the socket (h11 sends no answer to a request it has not parsed); then the
        connection closed, in stages unless not `is_lingering`."""
        request_id = new_request_id()
        error = ErrorDetail(type=ERROR_TYPES.get(status, "invalid_request_error"), code=code, message=message,
                            request_id=request_id)
        body = ErrorResponse(error=error).model_dump_json().encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
                   REQUEST_ID_HEADER: request_id, "X-Content-Type-Options": "nosniff", **API_HEADERS,
                   **(extra_headers or {})}
        head = f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items())
        self.raw_transport.write(head.encode("latin-1") + b"\r\n" + body)
        if is_lingering:
            self.close_in_stages(is_refusal=True)
        else:
            self.close_now()

    # The end of a request, and of the connection.

    def eof_received(self) -> bool | None:
        if self.is_lingering:
            return None  # the client has closed too: so do we
        self.has_peer_eof = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body:
            # Nothing, part of a head or part of a body: it can never be completed. Closed here, not by the transport,
            # so that an answer still being written to a client that does not read has its bound.
            self.close_now()
            return True
        # A whole request is in. The client may have shut only its sending side (and is answered), or closed and
        # gone (and its images should not run): a FIN says the same for both. An interim 100, which an HTTP/1.1
        # client must read and pass over (RFC 9110 section 15.2), tells them apart: a closed socket answers it
        # with a reset, which ends the request as a hang-up does.
        if not cycle.response_started and self.scope["http_version"] == "1.1":
            self.raw_transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                              reason=b"Continue")))
            cycle.waiting_for_100_continue = False
            self.watch_for_reset()
        return True

    def watch_for_reset(self) -> None:
        """Until the answer starts, looks every RESET_CHECK_S for a reset: the transport reads no more once the
        client's FIN is in, so a reset shows only as the socket's error."""
        if self.cycle.response_started or self.raw_transport.is_closing():
            return
        sock = self.raw_transport.get_extra_info("socket")
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.raw_transport.abort()  # uvicorn then tells the app the client has gone
            return
        self.loop.call_later(RESET_CHECK_S, self.watch_for_reset, context=contextvars.Context())

    def on_response_complete(self) -> None:
        self.start_head_timer()  # for the next head; a pipelined one already in stops it at once (handle_events)
        super().on_response_complete()
        # After the client's FIN, the requests it sent whole are answered; then there is nothing left to do.
        if self.has_peer_eof and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self.close_in_stages()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: an answer the client is not reading is abandoned by SHUTDOWN_TIMEOUT_S."""
        self.send_deadline = self.loop.time() + self.shutdown_timeout_s
        if self.is_lingering:
            self.linger_ends_at = min(self.linger_ends_at, self.send_deadline)
        if self.send_timer is not None or self.raw_transport.get_write_buffer_size():
            self.start_send_timer()
        super().shutdown()

    def close_in_stages(self, is_refusal: bool = False) -> None:
        """Closes the connection; if the client may still be sending (a body, pipelined requests, a refused
        connection's request), in stages: the answer, then our FIN, then what the client sends is discarded until
        it closes, goes quiet for LINGER_QUIET_S, or passes the linger's bounds."""
        transport = self.raw_transport
        if self.is_lingering or transport.is_closing():
            return
        buffered, _ = self.conn.trailing_data
        may_send = is_refusal or self.conn.their_state in (h11.SEND_BODY, h11.ERROR) or bool(buffered)
        if is_refusal and self.is_refused and HttpProtocol.refused_lingering >= MAX_REFUSED_LINGERING:
            may_send = False  # a flood of connections over the cap: their files matter more than their answers
        if self.has_peer_eof or not may_send or not transport.can_write_eof():
            self.close_now()
            return
        self.stop_head_timer()
        self.is_lingering = True
        if self.is_refused:
            HttpProtocol.refused_lingering += 1
        self.linger_ends_at = min(self.loop.time() + self.linger_max_s, self.send_deadline or float("inf"))
        self.linger_bytes_left = self.linger_max_bytes
        transport.write_eof()  # sent once the answer is
        transport.resume_reading()  # uvicorn's flow control may have paused it
        self.bound_the_flush()
        self.linger_timer = self.loop.call_later(LINGER_QUIET_S, self.stop_lingering_and_close,
                                                 context=contextvars.Context())

    def discard(self, size: int) -> None:
        self.linger_bytes_left -= size
        if self.linger_bytes_left <= 0 or self.loop.time() >= self.linger_ends_at:
            self.stop_lingering_and_close()
        elif self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = self.loop.call_later(LINGER_QUIET_S, self.stop_lingering_and_close,
                                                     context=contextvars.Context())

    def stop_lingering(self) -> None:
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        if self.is_lingering and self.is_refused:
            HttpProtocol.refused_lingering -= 1
            self.is_refused = False  # counted once

    def stop_lingering_and_close(self) -> None:
        self.stop_lingering()
        if self.raw_transport.get_write_buffer_size():
            self.raw_transport.abort()  # the client has read none of the answer in all this time
        else:
            self.raw_transport.close()

    def close_now(self) -> None:
        self.raw_transport.close()
        self.bound_the_flush()

    def bound_the_flush(self) -> None:
        """A closing transport keeps its socket until what it holds is written (under the high-water mark, no
        pause_writing started the timer): SEND_TIMEOUT_S bounds that too."""
        if self.send_timer is None and self.raw_transport.get_write_buffer_size():
            self.start_send_timer()

    # Answers the client does not read.

    def pause_writing(self) -> None:
        super().pause_writing()
        self.start_send_timer()

    def resume_writing(self) -> None:
        self.stop_send_timer()
        super().resume_writing()

    def start_send_timer(self) -> None:
        self.stop_send_timer()
        delay = self.send_timeout_s
        if self.send_deadline is not None:
            delay = max(0.0, min(delay, self.send_deadline - self.loop.time()))
        self.send_timer = self.loop.call_later(delay, self.abandon_answer, context=contextvars.Context())

    def stop_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def abandon_answer(self) -> None:
        self.send_timer = None
        ABANDONED.add(self.send_timeout_s)
        self.stop_lingering()
        self.raw_transport.abort()

    # Each request.

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = self.cycle  # this request's: the next one's starts only once this one is answered
        if has_both_lengths(scope["headers"]):
            cycle.keep_alive = False  # RFC 9112 section 6.1: read by Transfer-Encoding, then closed

        is_break_told = False

        async def receive_checked() -> Message:
            nonlocal is_break_told
            message = await receive()
            if self.broken_cycle is not cycle or message["type"] != "http.request":
                return message
            if not is_break_told:  # to a reader of the body, once (request_body.read_body raises MalformedBody)
                is_break_told = True
                return {**message, BODY_ERROR: self.broken_reason}
            # Read on only to watch for a hang-up (Starlette's file answers do): nothing more comes but the end.
            while message["type"] == "http.request":
                message = await receive()
            return message

        async def send_closing(message: Message) -> None:
            # more_body: h11 has not seen the body's end, so the connection cannot carry another request.
            if message["type"] == "http.response.start" and (cycle.more_body or not cycle.keep_alive):
                headers = list(message.get("headers", []))
                if CLOSE_HEADER not in headers:
                    message = {**message, "headers": headers + [CLOSE_HEADER]}
            await send(message)

        try:
            await self.served_app(scope, receive_checked, send_closing)
        except asyncio.CancelledError:
            if cycle.response_started:
                raise
            # uvicorn gave up on the request: nothing the log holds may be answered now, so no answer at all.
            logger.warning("%s %s cancelled as the server exits: closed unanswered", scope["method"], scope["path"])
            cycle.disconnected = True  # uvicorn then sends nothing
            self.close_now()
