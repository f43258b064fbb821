"""What /v1/usage reads: this key's /v1/classify rollups (rollups.py), never the request log itself.

A range is counted at the rollups' resolution: its start is rounded down to the minute and its end up (to the
bucket width, with buckets, so that each bucket is one rollup row). Totals read minutes only at the range's
ragged edges, hours beside them and days in between, so any range costs O(buckets), not O(requests); the
answer is what counting the log over the same (rounded) range gives, exactly.
"""

import time
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from db import ApiKey, UsageRollup
from errors import ApiError
from ratelimit import Decision
from rollups import COUNTS, HISTOGRAM, STATUS_COUNTS, percentile
from schemas import BUCKET_WIDTHS_S, ByStatus, Latency, Usage, UsageBucket

CLASSIFY_ENDPOINT = "/v1/classify"
MAX_BUCKETS = 2400  # 100 days by the hour
MINUTE, HOUR, DAY = 60, 3600, 86400
SUMS = [func.sum(UsageRollup.__table__.c[name]) for name in COUNTS]
Segment = tuple[int, int, int | None]  # a rollup width, and [from, to) in Unix seconds (None: no end)


async def read_usage(session: AsyncSession, api_key: ApiKey, limit_state: Decision, start_time: int | None,
                     end_time: int | None, bucket_width: str | None, retention_days: int) -> Usage:
    """This key's classify totals (within [start_time, end_time) when given) and, with bucket_width, per bucket."""
    end_time = checked_range(start_time, end_time, bucket_width)
    width_s = BUCKET_WIDTHS_S[bucket_width] if bucket_width is not None else MINUTE
    if start_time is not None:
        start_time = start_time // width_s * width_s
    if end_time is not None:
        end_time = -(-end_time // width_s) * width_s
    covered_from = max(start_time or 0, retention_cutoff_s(retention_days))
    rows = [UsageRollup.key_id == api_key.id, UsageRollup.endpoint == CLASSIFY_ENDPOINT]
    buckets = None
    async with session.begin():  # one snapshot, so the buckets add up to the totals
        if bucket_width is None:
            segments = covering(covered_from, end_time)
            found = (await session.execute(select(*SUMS).where(*rows, or_(*[
                and_(UsageRollup.width_s == width, UsageRollup.start_ms >= begin * 1000,
                     *([UsageRollup.start_ms < end * 1000] if end is not None else []))
                for width, begin, end in segments])))).one() if segments else [None] * len(COUNTS)
            totals = list(found)
        else:
            assert start_time is not None and end_time is not None
            by_start = {int(start_ms) // 1000: sums for start_ms, *sums in (await session.execute(
                select(UsageRollup.start_ms, *SUMS).where(
                    *rows, UsageRollup.width_s == width_s, UsageRollup.start_ms >= covered_from * 1000,
                    UsageRollup.start_ms < end_time * 1000).group_by(UsageRollup.start_ms))).all()}
            buckets = [UsageBucket(start_time=start, end_time=start + width_s, **figures(by_start.get(start)))
                       for start in range(start_time, end_time, width_s)]
            totals = [sum(sums[index] or 0 for sums in by_start.values()) for index in range(len(COUNTS))]
    summed = figures(totals)
    requests = summed["total_requests"]
    return Usage(
        key_prefix=api_key.prefix, **summed,
        success_rate=round(100 * summed["successful_requests"] / requests, 2) if requests else 0.0,
        avg_response_time_ms=round(totals[COUNTS.index("latency_ms_sum")] / requests, 2) if requests else 0.0,
        limit=limit_state.limit, window_seconds=api_key.window_s, remaining=limit_state.remaining,
        reset_seconds=limit_state.reset_s, start_time=start_time, end_time=end_time, covered_from=covered_from,
        bucket_width=bucket_width, buckets=buckets,
    )


def retention_cutoff_s(retention_days: int, now_s: float | None = None) -> int:
    """The first whole UTC day every rollup of which is kept (retention.py deletes only rows before it)."""
    now_s = time.time() if now_s is None else now_s
    return -(-int(now_s - retention_days * DAY) // DAY) * DAY


def covering(start: int, end: int | None) -> list[Segment]:
    """[start, end), both whole minutes, as the fewest rollups: minutes up to the first whole hour, hours up to the
    first whole day, days, then hours and minutes up to `end`."""
    segments: list[Segment] = []
    position = start
    for width, coarser in ((MINUTE, HOUR), (HOUR, DAY)):
        stop = -(-position // coarser) * coarser
        if end is not None:
            stop = min(stop, end // width * width)
        if stop > position:
            segments.append((width, position, stop))
            position = stop
    if end is None:
        return [*segments, (DAY, position, None)]
    for width in (DAY, HOUR, MINUTE):
        stop = end // width * width
        if stop > position:
            segments.append((width, position, stop))
            position = stop
    return segments


def figures(sums: Any) -> dict[str, Any]:
    """A bucket's (or the totals') fields from the summed rollup columns, in COUNTS' order (None: no rows)."""
    sums = [value or 0 for value in sums] if sums is not None else [0] * len(COUNTS)
    named = dict(zip(COUNTS, sums))
    histogram = [int(named[name]) for name in HISTOGRAM]
    return {"total_requests": int(named["requests"]), "successful_requests": int(named["succeeded"]),
            "images": int(named["images"]), "by_status": ByStatus(**{name: int(named[name]) for name in STATUS_COUNTS}),
            "latency_ms": Latency(p50=percentile(histogram, 0.5), p95=percentile(histogram, 0.95),
                                  p99=percentile(histogram, 0.99))}


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
        width_s = BUCKET_WIDTHS_S[bucket_width]
        count = -(-end_time // width_s) - start_time // width_s
        if count > MAX_BUCKETS:
            raise ApiError(400, "too_many_buckets", f"That range makes {count} buckets of {bucket_width}; at most "
                           f"{MAX_BUCKETS} are returned. Narrow start_time..end_time or use a wider bucket_width.")
    return end_time
