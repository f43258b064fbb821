"""What /v1/usage reads, and its answer's shape (`Usage`): this key's rollups of one endpoint (rollups.py), never
the request log itself.

A range is counted at the rollups' resolution: its start is rounded down to the minute and its end up (to the
bucket width, with buckets, so that each bucket is one rollup row). Totals read minutes only at the range's
ragged edges, hours beside them and days in between, so any range costs O(buckets), not O(requests); the
answer is what counting the log over the same (rounded) range gives, exactly.
"""

import time
from functools import partial
from itertools import chain
from typing import Any, Literal

import numpy as np
import orjson
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import CompoundSelect, Connection, Select, bindparam, false, func, select, union_all

from db import ApiKey, RollupBackfill, UsageRollup
from ledger.ratelimit import Decision
from ledger.reader import DatabaseReader
from ledger.retention import retention_cutoff_s
from ledger.rollups import COUNTS, HISTOGRAM, REPORTED_MS, STATUS_COUNTS
from operations.errors import ApiError

MAX_BUCKETS = 2400  # 100 days by the hour
BUCKET_WIDTHS_S = {"1m": 60, "1h": 3600, "1d": 86400}
MAX_UNIX_TIME_S = 32_503_680_000  # year 3000: keeps millisecond times inside a 64-bit integer
MINUTE, HOUR, DAY = 60, 3600, 86400
ROLLUPS = UsageRollup.__table__
COLUMNS = [ROLLUPS.c[name] for name in COUNTS]
SUMS = [func.sum(column) for column in COLUMNS]
BACKFILL_FRONTIER = select(RollupBackfill.frontier_ms).where(RollupBackfill.key_id == bindparam("key"))
Segment = tuple[int, int, int | None]  # a rollup width, and [from, to) in Unix seconds (None: no end)


class ByStatus(BaseModel):
    succeeded: int = Field(description="Answered 200.")
    client_errors: int = Field(description="Answered 4xx but 429: the request had to be fixed.")
    rate_limited: int = Field(description="Answered 429.")
    server_errors: int = Field(description="Answered 5xx (503 and 504 included).")


class Latency(BaseModel):
    """Server time percentiles from a histogram whose buckets grow by sqrt(2): within 19 % of the exact value
    between 1 ms and 32.8 s; null when there were no requests."""

    p50: float | None
    p95: float | None
    p99: float | None


class UsageBucket(BaseModel):
    start_time: int = Field(description="Unix seconds, inclusive.")
    end_time: int = Field(description="Unix seconds, exclusive.")
    total_requests: int
    successful_requests: int
    images: int = Field(description="The images those requests carried: what the rate limit charges.")
    by_status: ByStatus
    latency_ms: Latency


class Usage(BaseModel):
    object: Literal["usage"] = "usage"
    key_prefix: str = Field(examples=["sk-Qm3xTz8b"])
    endpoint: Literal["classify", "embeddings"] = Field("classify", description="Whose requests are counted: "
                                                        "/v1/classify's or /v1/embeddings'.")
    total_requests: int = Field(description="This key's requests to the endpoint, of every outcome (in the range, if given).")
    successful_requests: int = Field(description="Of those, the ones answered 200.")
    success_rate: float = Field(description="successful / total, in percent; 0 when there were none.")
    avg_response_time_ms: float = Field(description="Mean server time of those requests; 0 when there were none.")
    images: int = Field(description="The images those requests carried (each counts one against the limit).")
    by_status: ByStatus
    latency_ms: Latency
    limit: int = Field(description="Requests admitted per window.")
    window_seconds: int
    remaining: int = Field(description="Requests admissible right now.")
    reset_seconds: int = Field(description="Seconds until the oldest counted request leaves the window.")
    start_time: int | None = Field(None, description="The range counted: start_time rounded down to the minute "
                                                     "(to the bucket width with buckets), end_time rounded up.")
    end_time: int | None = None
    covered_from: int = Field(description="Unix seconds: the counts hold every request from here on; older ones "
                                          "have passed USAGE_RETENTION_DAYS, or were logged before an upgrade "
                                          "to the rollups and are still being counted. start_time (or 0) when "
                                          "nothing is missing.")
    bucket_width: str | None = None
    buckets: list[UsageBucket] | None = Field(None, description="Per-bucket counts, when bucket_width is given.")


async def read_usage(reader: DatabaseReader, api_key: ApiKey, limit_state: Decision, endpoint: str,
                     start_time: int | None, end_time: int | None, bucket_width: str | None,
                     retention_days: int) -> Response:
    """This key's totals on `endpoint` ("classify" or "embeddings"; within [start_time, end_time) when given)
    and, with bucket_width, per bucket: a `Usage`, as JSON, read and built in a reading thread."""
    end_time = checked_range(start_time, end_time, bucket_width)
    body = await reader.run(partial(usage_json, api_key=api_key, limit_state=limit_state, endpoint=endpoint,
                                    start_time=start_time, end_time=end_time, bucket_width=bucket_width,
                                    retention_days=retention_days))
    return Response(body, media_type="application/json")


def usage_json(connection: Connection, api_key: ApiKey, limit_state: Decision, endpoint: str,
               start_time: int | None, end_time: int | None, bucket_width: str | None, retention_days: int) -> bytes:
    """read_usage's answer, from one transaction (one snapshot, so the buckets add up to the totals); its buckets
    built as plain dicts: a thousand pydantic models cost tens of ms."""
    path = f"/v1/{endpoint}"  # as the log and its rollups name it
    width_s = BUCKET_WIDTHS_S[bucket_width] if bucket_width is not None else MINUTE
    if start_time is not None:
        start_time = start_time // width_s * width_s
    if end_time is not None:
        end_time = -(-end_time // width_s) * width_s
    cutoff_s = retention_cutoff_s(retention_days)
    # A key made since the cutoff has had nothing pass retention: its counts hold every request it made.
    covered_from = max(start_time or 0, cutoff_s if api_key.created_at_ms < cutoff_s * 1000 else 0)
    buckets = None
    # Requests from before the rollups are counted from the newest down (ledger/backfill.py): a key with
    # some left is covered from its frontier on, rounded up to whole buckets. Read first: on PostgreSQL each
    # statement sees its own snapshot, and a batch counted meanwhile only adds to rollups before this one.
    frontier_ms = connection.execute(BACKFILL_FRONTIER, {"key": api_key.id}).scalar()
    if frontier_ms is not None:
        covered_from = max(covered_from, -(-frontier_ms // (width_s * 1000)) * width_s)
    if bucket_width is None:
        found = connection.execute(totals_query(api_key.id, path, covered_from, end_time)).all()
        totals = np.array([[value or 0 for value in row] for row in found] or [[0] * len(COUNTS)],
                          dtype=np.float64).sum(axis=0)
    else:
        assert start_time is not None and end_time is not None
        found_rows = connection.execute(buckets_query(api_key.id, path, width_s, covered_from, end_time)).all()
        sums = np.zeros(((end_time - start_time) // width_s, len(COUNTS)))
        if found_rows:
            # Flattened: np.array of Rows is ten times slower, of tuples made of them a third slower
            found = np.fromiter(chain.from_iterable(found_rows), np.float64,
                                len(found_rows) * (1 + len(COUNTS))).reshape(len(found_rows), -1)
            np.add.at(sums, ((found[:, 0] // 1000 - start_time) // width_s).astype(np.int64), found[:, 1:])
        buckets = bucket_figures(start_time, width_s, sums)
        totals = sums.sum(axis=0)
    summed = figures(totals)
    requests = summed["total_requests"]
    usage = Usage(
        key_prefix=api_key.prefix, **summed,
        success_rate=round(100 * summed["successful_requests"] / requests, 2) if requests else 0.0,
        avg_response_time_ms=round(float(totals[COUNTS.index("latency_ms_sum")]) / requests, 2) if requests else 0.0,
        limit=limit_state.limit, window_seconds=api_key.window_s, remaining=limit_state.remaining,
        reset_seconds=limit_state.reset_s, endpoint=endpoint, start_time=start_time, end_time=end_time,
        covered_from=covered_from, bucket_width=bucket_width,
    )
    # orjson: the standard library's encoder took 7 ms for 2,160 hourly buckets, orjson 0.6
    return orjson.dumps({**usage.model_dump(), "buckets": buckets})


def totals_query(key_id: int, path: str, start: int, end: int | None) -> CompoundSelect | Select:
    """The sums over [start, end): one SELECT per segment of `covering`, each a range of the primary key (with OR
    between them, SQLite read all of the key's rollups). Rows to add up; none when the range is empty."""
    segments = [select(*SUMS).where(ROLLUPS.c.key_id == key_id, ROLLUPS.c.endpoint == path,
                                    ROLLUPS.c.width_s == width, ROLLUPS.c.start_ms >= begin * 1000,
                                    *([ROLLUPS.c.start_ms < stop * 1000] if stop is not None else []))
                for width, begin, stop in covering(start, end)]
    return union_all(*segments) if segments else select(*SUMS).where(false())


def buckets_query(key_id: int, path: str, width_s: int, start: int, end: int) -> Select:
    """The rollups of [start, end) of one width, one row per (start, endpoint, model version): summed with numpy,
    as the database's GROUP BY of 39 sums took as long as fetching the rows themselves."""
    return select(ROLLUPS.c.start_ms, *COLUMNS).where(
        ROLLUPS.c.key_id == key_id, ROLLUPS.c.endpoint == path, ROLLUPS.c.width_s == width_s,
        ROLLUPS.c.start_ms >= start * 1000, ROLLUPS.c.start_ms < end * 1000)


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


def figures(sums: np.ndarray) -> dict[str, Any]:
    """The totals' fields from the summed rollup columns, in COUNTS' order."""
    named = dict(zip(COUNTS, sums.tolist()))
    p50, p95, p99 = (none_if_nan(value) for [value] in latency_percentiles(sums[None, :]))
    return {"total_requests": int(named["requests"]), "successful_requests": int(named["succeeded"]),
            "images": int(named["images"]), "by_status": ByStatus(**{name: int(named[name]) for name in STATUS_COUNTS}),
            "latency_ms": Latency(p50=p50, p95=p95, p99=p99)}


def latency_percentiles(sums: np.ndarray) -> list[list[float]]:
    """p50, p95 and p99 of each row of summed rollup columns: the nearest-rank percentile of its requests, as its
    histogram bucket's REPORTED_MS (NaN for a row without requests), for all rows at once."""
    requests = sums[:, COUNTS.index("requests")]
    seen = sums[:, [COUNTS.index(name) for name in HISTOGRAM]].cumsum(axis=1)
    reported = np.array(REPORTED_MS)
    found = []
    for fraction in (0.5, 0.95, 0.99):
        rank = np.maximum(1, np.ceil(fraction * requests))
        at = reported[np.minimum((seen < rank[:, None]).sum(axis=1), len(HISTOGRAM) - 1)]
        found.append(np.where(requests > 0, at, np.nan).tolist())
    return found


def bucket_figures(start_time: int, width_s: int, sums: np.ndarray) -> list[dict[str, Any]]:
    """Each bucket's fields (a UsageBucket's) from its row of summed rollup columns, for all buckets at once; an
    empty bucket's percentiles are NaN, which orjson writes as null."""
    counts = sums[:, [COUNTS.index(name) for name in ("requests", "images", *STATUS_COUNTS)]].astype(np.int64)
    starts = range(start_time, start_time + len(sums) * width_s, width_s)
    return [{"start_time": start, "end_time": start + width_s, "total_requests": total, "successful_requests": succeeded,
             "images": images, "by_status": {"succeeded": succeeded, "client_errors": client_errors,
                                             "rate_limited": rate_limited, "server_errors": server_errors},
             "latency_ms": {"p50": fifty, "p95": ninety_five, "p99": ninety_nine}}
            for start, (total, images, succeeded, client_errors, rate_limited, server_errors), fifty, ninety_five,
            ninety_nine in zip(starts, counts.tolist(), *latency_percentiles(sums))]


def none_if_nan(value: float) -> float | None:
    return None if value != value else value  # NaN, the empty bucket's, is the only value unequal to itself


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
