"""Headers that make every answer safe for a browser to receive, whatever the route forgot.

Every answer: `X-Content-Type-Options: nosniff` (a JSON error is never run as a script or styled as CSS).
API answers (anything but HTML pages and /static files) also get `Cache-Control: no-store` (answers hold a
key's usage and rate-limit state: no shared cache may keep them) and `Content-Security-Policy:
default-src 'none'; frame-ancestors 'none'` (a JSON body opened in a browser runs nothing and cannot be
framed). A header the route set itself is kept: the web page at / has its own policy, and /docs its own
(Swagger UI's files, from /static, and its inline script: api_docs.py). Uvicorn's `server: uvicorn` banner carries no version; nothing here adds one.
"""

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                is_page = headers.get("content-type", "").startswith("text/html")
                if not (is_page or is_static):
                    for name, value in API_HEADERS.items():
                        headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
