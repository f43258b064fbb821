"""What /v1/usage reads from the request log: this key's /v1/classify rows, summed overall and per time bucket."""

import time

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from db import ApiKey, RequestLog
from errors import ApiError
from ratelimit import Decision
from schemas import BUCKET_WIDTHS_S, Usage, UsageBucket

CLASSIFY_ENDPOINT = "/v1/classify"
MAX_BUCKETS = 1000
SUCCESS_AS_ONE = case((RequestLog.status_code == 200, 1), else_=0)  # summed, it counts the 200s


async def read_usage(session: AsyncSession, api_key: ApiKey, limit_state: Decision, start_time: int | None,
                     end_time: int | None, bucket_width: str | None) -> Usage:
    """This key's classify totals (within [start_time, end_time) when given) and, with bucket_width, per bucket."""
    end_time = checked_range(start_time, end_time, bucket_width)
    # A replayed answer (Idempotency-Key) is its first request's: counted once, with that one.
    rows = [RequestLog.key_id == api_key.id, RequestLog.endpoint == CLASSIFY_ENDPOINT, RequestLog.replayed.is_(False)]
    if start_time is not None:
        rows.append(RequestLog.created_at_ms >= start_time * 1000)
    if end_time is not None:
        rows.append(RequestLog.created_at_ms < end_time * 1000)
    async with session.begin():  # one snapshot, so the buckets add up to the totals
        total, successful, avg_ms = (await session.execute(
            select(func.count(), func.sum(SUCCESS_AS_ONE), func.avg(RequestLog.latency_ms)).where(*rows))).one()
        buckets = None
        if bucket_width is not None:
            assert start_time is not None and end_time is not None
            buckets = await _buckets(session, rows, start_time, end_time, BUCKET_WIDTHS_S[bucket_width])
    successful = int(successful or 0)
    return Usage(
        key_prefix=api_key.prefix, total_requests=total, successful_requests=successful,
        success_rate=round(100 * successful / total, 2) if total else 0.0,
        avg_response_time_ms=round(avg_ms or 0.0, 2),
        limit=limit_state.limit, window_seconds=api_key.window_s, remaining=limit_state.remaining,
        reset_seconds=limit_state.reset_s,
        start_time=start_time, end_time=end_time, bucket_width=bucket_width, buckets=buckets,
    )


def checked_range(start_time: int | None, end_time: int | None, bucket_width: str | None) -> int | None:
    """The end of the range (now, for buckets without one), once the range makes sense and few enough buckets."""
    if bucket_width is not None and start_time is None:
        raise ApiError(400, "missing_start_time", "bucket_width needs start_time (Unix seconds) to know where buckets begin.")
    if bucket_width is not None and end_time is None:
        end_time = int(time.time()) + 1
    if start_time is not None and end_time is not None and start_time >= end_time:
        raise ApiError(400, "invalid_time_range", "start_time must be before end_time (both Unix seconds).")
    if bucket_width is not None:
        assert start_time is not None and end_time is not None
        count = -(-(end_time - start_time) // BUCKET_WIDTHS_S[bucket_width])
        if count > MAX_BUCKETS:
            raise ApiError(400, "too_many_buckets", f"That range makes {count} buckets of {bucket_width}; at most "
                           f"{MAX_BUCKETS} are returned. Narrow start_time..end_time or use a wider bucket_width.")
    return end_time


async def _buckets(session: AsyncSession, rows: list[ColumnElement[bool]], start_time: int, end_time: int,
                   width_s: int) -> list[UsageBucket]:
    """Counts per bucket from one GROUP BY; empty buckets included, so the series has no gaps."""
    index = (RequestLog.created_at_ms - start_time * 1000) // (width_s * 1000)  # integer division in every dialect
    found = (await session.execute(select(index, func.count(), func.sum(SUCCESS_AS_ONE)).where(*rows).group_by(index))).all()
    counts = {int(i): (int(total), int(successful)) for i, total, successful in found}
    return [UsageBucket(start_time=start, end_time=min(end_time, start + width_s),
                        total_requests=counts.get(i, (0, 0))[0], successful_requests=counts.get(i, (0, 0))[1])
            for i, start in enumerate(range(start_time, end_time, width_s))]
