"""Per-key sliding-window rate limit: at most N admitted requests in any window of S seconds.

As in alisaifee/limits, the rule is apart from where the window lives. The storage does the one thing that
must be atomic ("if fewer than N since now - S, record now") and reports what it saw; the limiter turns that
into a `Decision`. Nothing here knows about HTTP: a dependency in main.py makes 429s and headers of it.

A true sliding window, not fixed buckets: every admitted request is a timestamp that counts until exactly
S seconds later, so no burst at a bucket boundary ever gets 2N through.
"""

import math
import time
from typing import NamedTuple, Protocol

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db import RateLimitHit, now_ms, write_transaction


class Decision(NamedTuple):
    allowed: bool
    limit: int
    remaining: int  # requests still admissible in the window, after this one
    reset_s: int  # whole seconds until the oldest counted request leaves the window (remaining goes up); 0 if none
    retry_after_s: int  # whole seconds until a request would be admitted; 0 when it would be now


class WindowState(NamedTuple):
    """What the storage counted inside (now - window, now], before recording anything; times in ms."""

    now_ms: int  # the storage's clock when it counted
    count: int
    oldest_ms: int | None  # the earliest counted request
    freeing_ms: int | None  # when `cost` more would not fit: the hit whose expiry makes room for them


class WindowStorage(Protocol):
    """Where the window lives. `admit` must be atomic per key: count, decide and record `cost` hits (all or
    none) as one step."""

    async def admit(self, key_id: int, limit: int, window_ms: int, cost: int = 1) -> tuple[bool, WindowState]: ...

    async def peek(self, key_id: int, limit: int, window_ms: int) -> WindowState: ...


class SqlWindowStorage:
    """The window as rows of `rate_limit_hits`, counted and added in one write transaction.

    On SQLite that transaction starts with BEGIN IMMEDIATE, so it holds the database's single write lock from
    its first statement to the insert, whatever that statement is: requests racing in one process, or in
    several processes on one file, queue there, and none can count before another has recorded.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def admit(self, key_id: int, limit: int, window_ms: int, cost: int = 1) -> tuple[bool, WindowState]:
        async with write_transaction(self.engine) as connection:
            at_ms = now_ms()  # under the lock: admissions are recorded in the order of their times
            # Expired hits are never read again; dropping them keeps each key's rows at most its limit.
            await connection.execute(
                delete(RateLimitHit).where(RateLimitHit.key_id == key_id, RateLimitHit.at_ms <= at_ms - window_ms))
            state = await self._count(connection, key_id, limit, at_ms, window_ms, cost)
            is_allowed = state.count + cost <= limit
            if is_allowed:
                await connection.execute(insert(RateLimitHit), [{"key_id": key_id, "at_ms": at_ms}] * cost)
        return is_allowed, state

    async def peek(self, key_id: int, limit: int, window_ms: int) -> WindowState:
        async with self.engine.connect() as connection:
            return await self._count(connection, key_id, limit, now_ms(), window_ms)

    @staticmethod
    async def _count(connection: AsyncConnection, key_id: int, limit: int, at_ms: int, window_ms: int,
                     cost: int = 1) -> WindowState:
        in_window = (RateLimitHit.key_id == key_id, RateLimitHit.at_ms > at_ms - window_ms)
        count, oldest_ms = (await connection.execute(
            select(func.count(), func.min(RateLimitHit.at_ms)).where(*in_window))).one()
        freeing_ms = None
        if count + cost > limit:
            # Room for `cost` comes when the hit at this offset expires (a lowered limit can leave more than
            # `limit` hits, so the offset is not always 0).
            freeing_ms = await connection.scalar(select(RateLimitHit.at_ms).where(*in_window)
                                                 .order_by(RateLimitHit.at_ms).offset(count + cost - limit - 1).limit(1))
        return WindowState(at_ms, count, oldest_ms, freeing_ms)


def _whole_seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


class SlidingWindowLimiter:
    def __init__(self, storage: WindowStorage) -> None:
        self.storage = storage
        # key_id -> (limit, window_s, monotonic time a slot frees): windows this process saw full.
        self._full_until: dict[int, tuple[int, int, float]] = {}

    def known_full(self, key_id: int, limit: int, window_s: int) -> Decision | None:
        """A refusal without asking the storage, when this process saw the window full and no hit in it has
        expired since. Other processes' admissions can only fill it more, so it is never wrong: it lets a
        throttled client be refused before its body is read."""
        seen = self._full_until.get(key_id)
        if seen is None or seen[:2] != (limit, window_s):
            return None
        wait_ms = (seen[2] - time.monotonic()) * 1000
        if wait_ms <= 0:
            del self._full_until[key_id]
            return None
        retry_after_s = max(1, _whole_seconds(wait_ms))
        return Decision(False, limit, 0, retry_after_s, retry_after_s)

    async def hit(self, key_id: int, limit: int, window_s: int, cost: int = 1) -> Decision:
        """Admit and record `cost` requests (all or none) if the window has room; otherwise say how long to wait.

        `cost` must be at most `limit`: a larger one could never be admitted.
        """
        assert 1 <= cost <= limit
        is_allowed, state = await self.storage.admit(key_id, limit, window_s * 1000, cost)
        if not is_allowed:
            if cost == 1 and state.freeing_ms is not None:  # full even for one: nothing fits until a hit expires
                frees_in_s = (state.freeing_ms + window_s * 1000 - state.now_ms) / 1000
                self._full_until[key_id] = (limit, window_s, time.monotonic() + frees_in_s)
            return _full(limit, window_s * 1000, state)
        oldest_ms = state.now_ms if state.oldest_ms is None else state.oldest_ms  # an empty window: this one
        return _open(limit, window_s * 1000, state.now_ms, state.count + cost, oldest_ms)

    async def peek(self, key_id: int, limit: int, window_s: int) -> Decision:
        """Where the window stands now, recording nothing."""
        state = await self.storage.peek(key_id, limit, window_s * 1000)
        if state.count >= limit:
            return _full(limit, window_s * 1000, state)
        return _open(limit, window_s * 1000, state.now_ms, state.count, state.oldest_ms)


def _open(limit: int, window_ms: int, at_ms: int, counted: int, oldest_ms: int | None) -> Decision:
    reset_s = 0 if oldest_ms is None else _whole_seconds(oldest_ms + window_ms - at_ms)
    return Decision(True, limit, limit - counted, reset_s, 0)


def _full(limit: int, window_ms: int, state: WindowState) -> Decision:
    assert state.freeing_ms is not None
    retry_after_s = max(1, _whole_seconds(state.freeing_ms + window_ms - state.now_ms))
    return Decision(False, limit, 0, retry_after_s, retry_after_s)
