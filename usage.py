"""The request log and what is read from it.

Every /v1 request becomes a `request_log` row, committed before its response starts, so the log never has
fewer rows than answers; `/v1/usage` sums this key's /v1/classify rows, overall and per time bucket.
"""

import logging
import time

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.exc import OperationalError, TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import ApiKey, RequestLog, now_ms
from errors import ApiError, database_unavailable, internal_error, json_error
from ratelimit import Decision
from schemas import BUCKET_WIDTHS_S, Usage, UsageBucket

logger = logging.getLogger("classify")

CLASSIFY_ENDPOINT = "/v1/classify"
MAX_BUCKETS = 1000
IS_SUCCESS = case((RequestLog.status_code == 200, 1), else_=0)


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
        is_recorded = scope["path"].startswith("/v1/")
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        is_started = is_replaced = False

        async def send_after_recording(message: Message) -> None:
            nonlocal is_started, is_replaced
            if message["type"] == "http.response.start":
                is_started = True
                try:
                    if is_recorded:
                        await self.record(scope, state, message["status"], started)
                except (OperationalError, PoolTimeoutError) as exc:
                    logger.warning("request log unavailable, answering 503: %s", exc)
                    is_replaced = True
                    await json_error(database_unavailable())(scope, receive, send)
                    return
            if not is_replaced:
                await send(message)

        try:
            await self.app(scope, receive, send_after_recording)
        except Exception as exc:
            if is_started:
                raise  # too late for another answer
            logger.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
            state["error_code"] = "internal_error"
            await json_error(internal_error())(scope, receive, send_after_recording)

    @staticmethod
    async def record(scope: Scope, state: dict, status_code: int, started: float) -> None:
        sessions: async_sessionmaker = scope["app"].state.sessions
        row = RequestLog(key_id=state.get("key_id"), endpoint=scope["path"][:64], method=scope["method"][:8],
                         status_code=status_code, latency_ms=(time.perf_counter() - started) * 1000,
                         created_at_ms=now_ms(), error_code=state.get("error_code"))
        async with sessions() as session, session.begin():
            session.add(row)


async def read_usage(session: AsyncSession, api_key: ApiKey, limit_state: Decision, start_time: int | None,
                     end_time: int | None, bucket_width: str | None) -> Usage:
    """This key's classify totals (within [start_time, end_time) when given) and, with bucket_width, per bucket."""
    if bucket_width is not None and start_time is None:
        raise ApiError(400, "missing_start_time", "bucket_width needs start_time (Unix seconds) to know where buckets begin.")
    if bucket_width is not None and end_time is None:
        end_time = int(time.time()) + 1
    if start_time is not None and end_time is not None and start_time >= end_time:
        raise ApiError(400, "invalid_time_range", "start_time must be before end_time (both Unix seconds).")
    rows = [RequestLog.key_id == api_key.id, RequestLog.endpoint == CLASSIFY_ENDPOINT]
    if start_time is not None:
        rows.append(RequestLog.created_at_ms >= start_time * 1000)
    if end_time is not None:
        rows.append(RequestLog.created_at_ms < end_time * 1000)

    buckets = None
    if bucket_width is not None:
        assert start_time is not None and end_time is not None
        buckets = await _buckets(session, rows, start_time, end_time, bucket_width)
    async with session.begin():
        total, successful, avg_ms = (await session.execute(
            select(func.count(), func.sum(IS_SUCCESS), func.avg(RequestLog.latency_ms)).where(*rows))).one()
    successful = int(successful or 0)
    return Usage(
        key_prefix=api_key.prefix, total_requests=total, successful_requests=successful,
        success_rate=round(100 * successful / total, 2) if total else 0.0,
        avg_response_time_ms=round(avg_ms or 0.0, 2),
        limit=limit_state.limit, window_seconds=api_key.window_s, remaining=limit_state.remaining,
        reset_seconds=limit_state.reset_s,
        start_time=start_time, end_time=end_time, bucket_width=bucket_width, buckets=buckets,
    )


async def _buckets(session: AsyncSession, rows: list[ColumnElement[bool]], start_time: int, end_time: int,
                   bucket_width: str) -> list[UsageBucket]:
    """Counts per bucket from one GROUP BY; empty buckets included, so the series has no gaps."""
    width_s = BUCKET_WIDTHS_S[bucket_width]
    count = -(-(end_time - start_time) // width_s)
    if count > MAX_BUCKETS:
        raise ApiError(400, "too_many_buckets", f"That range makes {count} buckets of {bucket_width}; at most "
                       f"{MAX_BUCKETS} are returned. Narrow start_time..end_time or use a wider bucket_width.")
    index = (RequestLog.created_at_ms - start_time * 1000) // (width_s * 1000)  # integer division in every dialect
    async with session.begin():
        found = (await session.execute(
            select(index, func.count(), func.sum(IS_SUCCESS)).where(*rows).group_by(index))).all()
    counts = {int(i): (int(total), int(successful)) for i, total, successful in found}
    return [UsageBucket(start_time=start_time + i * width_s, end_time=min(end_time, start_time + (i + 1) * width_s),
                        total_requests=counts.get(i, (0, 0))[0], successful_requests=counts.get(i, (0, 0))[1])
            for i in range(count)]
