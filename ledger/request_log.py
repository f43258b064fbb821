"""The request log: every /v1 request becomes a `request_log` row, committed before its response starts.

So the log never holds fewer requests than were answered, and `/v1/usage` (usage.py) can be read from it.
The row is handed to the database thread (ledger/writer.py), which commits it with the other writes of
its moment: the rows and admissions of requests answered together share one transaction.
Every HTTP request, /v1 or not, is also counted in the metrics below and gets one line in the server's log
(operations/logs.py): its id, route, status, latency, key prefix, model and batch size.
Its response header `Server-Timing` says where the request's time went (auth, limit, parse, decode, queue,
model, log: milliseconds), so a benchmark can find the next bottleneck.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import RequestLog, now_ms, waiting_until
from ledger.writer import DatabaseWriter
from operations.errors import ApiError, database_unavailable, internal_error, is_database_unavailable, json_error
from operations.metrics import Counter, Histogram

logger = logging.getLogger("classify")
access_logger = logging.getLogger("classify.access")

# Labelled by the route's template (/v1/classify), never the raw path, so a scan of random URLs adds no series.
UNMATCHED_ROUTE = "unmatched"
REQUESTS = Counter("http_requests_total", "HTTP requests answered, by route and status.", ["route", "status"])
REQUEST_SECONDS = Histogram("http_request_duration_seconds", "Time from a request's arrival to its answer's start.",
                            ["route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
QUIET_ROUTES = {"/healthz", "/readyz", "/metrics"}  # probed every few seconds: their lines are DEBUG
URL_PATH_CHARACTERS = "/:@!$&'()*+,;="  # RFC 3986's, beside letters, digits and -._~


def endpoint(path: str) -> str:
    """The path as a client would send it, percent-encoded, cut to the column's 64 characters: text every
    database holds (PostgreSQL refuses the NUL of `/v1/%00`), and `/v1/classify` as is for /v1/usage."""
    return quote(path, safe=URL_PATH_CHARACTERS, errors="replace")[:64]


def add_timing(request: Request, stage: str, started: float) -> None:
    """Milliseconds since `started` (time.perf_counter()), reported in the Server-Timing header as `stage`."""
    request.state.timings[stage] = (time.perf_counter() - started) * 1000


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={ms:.2f}" for stage, ms in timings.items())


class RequestLogMiddleware:
    """Records each /v1 request (key, endpoint, status, latency, error code) before its response starts.

    The route leaves `key_id` and `error_code` in the request's state (and `write_log_row`, to write the row with
    something that must be committed with it). If the row cannot be written, the client
    gets a 503 instead of the answer: an answer the log does not hold would make the books wrong. An unexpected
    exception becomes the standard 500 here, with its traceback in the server log and its row in the request log;
    re-raised, it would make the server drop the connection before the client could read the 500.

    It sits outside CORSMiddleware, so the preflights that one answers by itself are recorded too; its own
    answers get the CORS headers the app's answers get, from the same `cors_options`.
    """

    def __init__(self, app: ASGIApp, cors_options: dict[str, Any] | None = None) -> None:
        self.app = app
        self.cors_options = cors_options

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_recorded = scope["path"] == "/v1" or scope["path"].startswith("/v1/")
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        timings: dict[str, float] = state.setdefault("timings", {})
        is_started = is_replaced = False

        async def send_after_recording(message: Message) -> None:
            nonlocal is_started, is_replaced
            if message["type"] == "http.response.start":
                is_started = True
                error = None
                if is_recorded:
                    recording = time.perf_counter()
                    error = await self.record(scope, state, message["status"], started)
                    timings["log"] = (time.perf_counter() - recording) * 1000
                self.report(scope, state, error.status_code if error else message["status"], started)
                if error:
                    is_replaced = True
                    await self.answer(error, scope, receive, send)
                elif timings:
                    MutableHeaders(scope=message).append("Server-Timing", server_timing(timings))
            if not is_replaced:
                await send(message)

        if is_recorded and not await scope["app"].state.database_file.is_usable():
            # Its row would go into a deleted file (database_file.py): nothing is done that the log cannot hold.
            logger.warning("database file missing: answering 503")
            state["error_code"] = "database_unavailable"
            self.report(scope, state, 503, started)
            await self.answer(database_unavailable(), scope, receive, send)
            return
        # One deadline for all of the request's waits for the database, its log row's included.
        with waiting_until(time.monotonic() + scope["app"].state.settings.db_timeout_s):
            try:
                await self.app(scope, receive, send_after_recording)
            except Exception as exc:
                if is_started:
                    raise  # too late for another answer
                logger.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
                state["error_code"] = "internal_error"
                await self.answer(internal_error(), scope, receive, send_after_recording)

    async def answer(self, error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        """This middleware's own answer, in the one error shape, with CORS headers when the app's would have them."""
        response = json_error(error, scope["state"].get("rate_limit_headers"))
        headers = Headers(scope=scope)
        if self.cors_options is None or "origin" not in headers:
            await response(scope, receive, send)
            return
        # simple_response, not the middleware's own call: that would answer a preflight with a 200 instead
        await CORSMiddleware(response, **self.cors_options).simple_response(scope, receive, send, headers)

    @staticmethod
    def report(scope: Scope, state: dict[str, Any], status_code: int, started: float) -> None:
        """The request's metrics and its one line in the server log."""
        latency_s = time.perf_counter() - started
        route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
        REQUESTS.labels(route, str(status_code)).inc()
        REQUEST_SECONDS.labels(route).observe(latency_s)
        fields = {"method": scope["method"], "route": route, "status": status_code,
                  "latency_ms": round(latency_s * 1000, 2), "key_prefix": state.get("key_prefix"),
                  "model": state.get("model_name"), "batch_size": state.get("batch_size"),
                  "error_code": state.get("error_code")}
        extras = " ".join(f"{name}={fields[name]}" for name in ("key_prefix", "model", "batch_size", "error_code")
                          if fields[name] is not None)
        access_logger.log(logging.DEBUG if route in QUIET_ROUTES else logging.INFO, "%s %s %d %.1f ms %s",
                          scope["method"], route, status_code, latency_s * 1000, extras, extra={"fields": fields})

    @staticmethod
    async def record(scope: Scope, state: dict[str, Any], status_code: int, started: float) -> ApiError | None:
        """Writes the row; if it cannot be written, the error to answer instead."""
        writer: DatabaseWriter = scope["app"].state.database_writer
        row = {"key_id": state.get("key_id"), "endpoint": endpoint(scope["path"]), "method": scope["method"][:8],
               "status_code": status_code, "latency_ms": (time.perf_counter() - started) * 1000,
               "created_at_ms": now_ms(), "error_code": state.get("error_code"),
               "request_id": state.get("request_id"), "model_version": state.get("model_version"),
               "replayed": state.get("is_replayed", False), "images": state.get("images", 0)}
        # What must be committed with the row, if anything (idempotency.py: the answer to store), writes it.
        write_log_row: Callable[[dict[str, Any]], Awaitable[None]] | None = state.get("write_log_row")
        try:
            if write_log_row is not None:
                await write_log_row(row)
            else:
                await writer.insert(RequestLog, row)  # committed with the other writes of its group
        except Exception as exc:
            if is_database_unavailable(exc):
                logger.warning("request log unavailable, answering 503: %s", exc)
                return database_unavailable()
            logger.error("could not write the request log", exc_info=exc)
            return internal_error()
        return None
