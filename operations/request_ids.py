"""Request ids: every HTTP answer carries `X-Request-ID`, the client's own if it is sane, otherwise a new one.

The id is in the request's log row, in every error body (`"request_id"` inside `"error"`) and on every log line
written while the request runs (logs.py reads it from `current_request_id`), so one id finds a request in all
three. A client's id is taken only if it is 1 to 128 characters of letters, digits and `._:-`: anything else
could forge log lines or carry a payload, so it is replaced rather than echoed.
"""

import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Set for the task that serves a request; tasks and callbacks it starts inherit it, threads do not.
current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id":
            sent = value.decode("latin-1")
            return sent if ACCEPTED.fullmatch(sent) else new_request_id()
    return new_request_id()


class RequestIdMiddleware:
    """The outermost middleware, so 404s, 405s and 500s get an id too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
