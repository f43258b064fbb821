"""The HTTP/1.1 connection: uvicorn's h11 protocol, with the limits a server facing the public needs.

    $ uvicorn main:app --http http_protocol:HttpProtocol ...     (make run does; so do the tests' servers)

What it adds to uvicorn's H11Protocol, in the order a connection meets it:

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
import logging
from typing import Any

import h11
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

from errors import ErrorDetail, ErrorResponse
from requestid import HEADER as REQUEST_ID_HEADER, new_request_id
from security_headers import API_HEADERS

logger = logging.getLogger("classify")

MAX_HEAD_BYTES = 16 * 1024  # request line and headers; a key and a few headers take well under 1 KiB
HEAD_END = b"\r\n\r\n"


class HttpProtocol(H11Protocol):
    """uvicorn's H11Protocol and the limits above; uvicorn makes one for each connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served_app = self.app
        self.app = self.serve  # what uvicorn runs for each request

    def handle_events(self) -> None:
        # Between requests h11 holds the next head unparsed; once it is complete, h11 takes it at any size.
        if self.conn.their_state is h11.IDLE and self.buffered_head_bytes() > MAX_HEAD_BYTES:
            self.refuse_head()
            return
        super().handle_events()

    def buffered_head_bytes(self) -> int:
        buffered, _ = self.conn.trailing_data
        end = buffered.find(HEAD_END, 0, MAX_HEAD_BYTES + len(HEAD_END))
        return len(buffered) if end < 0 else end + len(HEAD_END)

    def refuse_head(self) -> None:
        """A 431 written straight to the socket (h11 sends no answer to a request it has not parsed); then close."""
        request_id = new_request_id()
        error = ErrorDetail(type="invalid_request_error", code="request_head_too_large", request_id=request_id,
                            message=f"The request line and headers are over {MAX_HEAD_BYTES} bytes; send fewer "
                                    "or shorter headers.")
        body = ErrorResponse(error=error).model_dump_json().encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
                   REQUEST_ID_HEADER: request_id, "X-Content-Type-Options": "nosniff", **API_HEADERS}
        head = "HTTP/1.1 431 Request Header Fields Too Large\r\n" + "".join(f"{name}: {value}\r\n"
                                                                            for name, value in headers.items())
        logger.warning("request head over %d bytes from %s: answered 431", MAX_HEAD_BYTES, self.client)
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
