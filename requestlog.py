"""The request log: every /v1 request becomes a `request_log` row, committed before its response starts.

So the log never holds fewer requests than were answered, and `/v1/usage` (usage.py) can be read from it.
Its response header `Server-Timing` says where the request's time went (auth, limit, parse, decode, queue,
model, log: milliseconds), so a benchmark can find the next bottleneck.
"""

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import RequestLog, now_ms
from errors import ApiError, database_unavailable, internal_error, is_database_unavailable, json_error

logger = logging.getLogger("classify")


class LogWriter:
    """Commits rows in groups: each caller waits for the commit that holds its row, and rows that arrive while
    one commit runs go together in the next. Under load that is one transaction for several requests instead
    of one each, and the database's write lock is taken once for them all."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self.flushing: asyncio.Task[None] | None = None

    async def write(self, row: dict[str, Any]) -> None:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((row, future))
        if self.flushing is None or self.flushing.done():
            self.flushing = asyncio.create_task(self._flush())
        await asyncio.shield(future)  # a caller that is cancelled does not take its row out of the group

    async def _flush(self) -> None:
        while self.pending:
            group, self.pending = self.pending, []
            try:
                async with self.engine.begin() as connection:
                    await connection.execute(insert(RequestLog), [row for row, _ in group])
            except BaseException as exc:  # cancelled too: no caller may be left waiting
                for _, future in group:
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("the log write was cancelled"))
                    future.add_done_callback(_mark_seen)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, future in group:
                    future.set_result(None)


def _mark_seen(future: asyncio.Future[None]) -> None:
    future.exception()  # a caller cancelled meanwhile never reads it; asyncio would log it as lost


def add_timing(request: Request, stage: str, started: float) -> None:
    """Milliseconds since `started` (time.perf_counter()), reported in the Server-Timing header as `stage`."""
    request.state.timings[stage] = (time.perf_counter() - started) * 1000


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={ms:.2f}" for stage, ms in timings.items())


class RequestLogMiddleware:
    """Records each /v1 request (key, endpoint, status, latency, error code) before its response starts.

    The route leaves `key_id` and `error_code` in the request's state. If the row cannot be written, the client
    gets a 503 instead of the answer: an answer the log does not hold would make the books wrong. An unexpected
    exception becomes the standard 500 here, with its traceback in the server log and its row in the request log;
    re-raised, it would make the server drop the connection before the client could read the 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
                if is_recorded:
                    recording = time.perf_counter()
                    if error := await self.record(scope, state, message["status"], started):
                        is_replaced = True
                        await json_error(error, state.get("rate_limit_headers"))(scope, receive, send)
                    timings["log"] = (time.perf_counter() - recording) * 1000
                if timings and not is_replaced:
                    MutableHeaders(scope=message).append("Server-Timing", server_timing(timings))
            if not is_replaced:
                await send(message)

        try:
            await self.app(scope, receive, send_after_recording)
        except Exception as exc:
            if is_started:
                raise  # too late for another answer
            logger.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
            state["error_code"] = "internal_error"
            await json_error(internal_error(), state.get("rate_limit_headers"))(scope, receive, send_after_recording)

    @staticmethod
    async def record(scope: Scope, state: dict[str, Any], status_code: int, started: float) -> ApiError | None:
        """Writes the row; if it cannot be written, the error to answer instead."""
        writer: LogWriter = scope["app"].state.log_writer
        row = {"key_id": state.get("key_id"), "endpoint": scope["path"][:64], "method": scope["method"][:8],
               "status_code": status_code, "latency_ms": (time.perf_counter() - started) * 1000,
               "created_at_ms": now_ms(), "error_code": state.get("error_code")}
        try:
            await writer.write(row)
        except Exception as exc:
            if is_database_unavailable(exc):
                logger.warning("request log unavailable, answering 503: %s", exc)
                return database_unavailable()
            logger.error("could not write the request log", exc_info=exc)
            return internal_error()
        return None
