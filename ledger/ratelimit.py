"""Per-key sliding-window rate limit: at most N admitted requests in any window of S seconds.

As in alisaifee/limits, the rule is apart from where the window lives. The storage does the one thing that
must be atomic ("if fewer than N since now - S, record now") and reports what it saw; the limiter turns that
into a `Decision`. Nothing here knows about HTTP: edge/image_requests.py makes 429s and headers of it.

A true sliding window, not fixed buckets: every admitted request is a timestamp that counts until exactly
S seconds later, so no burst at a bucket boundary ever gets 2N through.

Two storages: `SqlWindowStorage` (SQLite or PostgreSQL, the default) and `RedisWindowStorage` (REDIS_URL set).
"""

import logging
import math
import secrets
import time
from collections.abc import Callable
from functools import cache, partial
from typing import NamedTuple, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import BigInteger, Insert, bindparam, cast, delete, func, select

from db import ApiKey, RateLimitCount, RateLimitHit, now_ms
from ledger.writer import DatabaseWriter, Transaction, dialect_insert

logger = logging.getLogger("classify")

PEEK_ATTEMPTS = 3  # a peek counts again when rows it counted went meanwhile (SqlWindowStorage._peek)

# PostgreSQL's own clock, in ms: hosts whose clocks disagree still record admissions in one order.
POSTGRES_NOW_MS = cast(func.floor(func.extract("epoch", func.clock_timestamp()) * 1000), BigInteger)


class Decision(NamedTuple):
    allowed: bool
    limit: int
    remaining: int  # requests still admissible in the window, after this one (if admitted; a refusal takes none)
    reset_s: int  # whole seconds until the oldest counted request leaves the window (remaining goes up); 0 if none
    retry_after_s: int  # whole seconds until a request would be admitted; 0 when it would be now


class WindowState(NamedTuple):
    """What the storage counted inside (now - window, now], before recording anything; times in ms."""

    now_ms: int  # the storage's clock when it counted
    count: int
    oldest_ms: int | None  # the earliest counted request
    freeing_ms: int | None  # when `cost` more would not fit: the hit whose expiry makes room for them


# Called with the cost as a request is admitted, before anything is recorded; if it raises, nothing is.
OnAdmit = Callable[[int], None]


class AdmissionGuard(Protocol):
    """Decided in the database before an admission counts anything (idempotency.Claim): `enter` may refuse the
    request by raising, and `leave` undoes it when the admission is refused. `at_ms`: the clock the admission
    read under the key's row lock, or None (no lock taken yet); `is_key_locked`: the transaction holds that lock."""

    def enter(self, transaction: Transaction, *, at_ms: int | None) -> None: ...

    def leave(self, transaction: Transaction, *, is_key_locked: bool) -> None: ...


class WindowStorage(Protocol):
    """Where the window lives. `admit` must be atomic per key: count, decide and record `cost` hits (all or
    none) as one step; `on_admit` runs inside that step, once the hits are due to be recorded. A `guard` enters
    before the count, in the database (in the same transaction when the window is there too)."""

    async def admit(self, key_id: int, limit: int, window_ms: int, cost: int = 1, on_admit: OnAdmit | None = None,
                    guard: AdmissionGuard | None = None) -> tuple[bool, WindowState]: ...

    async def peek(self, key_id: int, limit: int, window_ms: int) -> WindowState: ...


# Module-level, so each is compiled once (writer.Transaction); `since_ms` is now - window.
IN_WINDOW = (RateLimitHit.key_id == bindparam("key_id"), RateLimitHit.at_ms > bindparam("since_ms"))
DELETE_EXPIRED = delete(RateLimitHit).where(RateLimitHit.key_id == bindparam("key_id"),
                                            RateLimitHit.at_ms <= bindparam("since_ms"))
COUNT = select(func.count(), func.min(RateLimitHit.at_ms)).where(*IN_WINDOW)  # a peek's: it deletes nothing
OLDEST = select(func.min(RateLimitHit.at_ms)).where(*IN_WINDOW)  # the index's first entry: no count
KEPT_COUNT = select(RateLimitCount.hits).where(RateLimitCount.key_id == bindparam("key_id"))
RECOUNT = select(func.count()).where(RateLimitHit.key_id == bindparam("key_id"))  # every row the kept count counts
HIT_AT_OFFSET = select(RateLimitHit.at_ms).where(*IN_WINDOW).order_by(RateLimitHit.at_ms).offset(
    bindparam("offset")).limit(1)
# FOR NO KEY UPDATE, not FOR UPDATE: request-log inserts, whose foreign key only share-locks the row, pass.
# The clock is read by the outer query, after the CTE holds the lock: in one SELECT ... FOR UPDATE it would be
# read when the row is first met, before the wait, and a hit stamped early leaves early.
LOCK_KEY_AND_READ_CLOCK = select(POSTGRES_NOW_MS).select_from(
    select(ApiKey.id).where(ApiKey.id == bindparam("key_id")).with_for_update(key_share=True)
    .cte("locked").prefix_with("MATERIALIZED"))
READ_CLOCK = select(POSTGRES_NOW_MS)


@cache
def set_count(dialect_name: str) -> Insert:
    """The key's `rate_limit_counts` row set to :hits (made if it has none); SQLite and PostgreSQL spell it alike."""
    statement = dialect_insert(dialect_name)(RateLimitCount)
    return statement.on_conflict_do_update(index_elements=["key_id"], set_={"hits": statement.excluded.hits})


class SqlWindowStorage:
    """The window as rows of `rate_limit_hits`, counted and added in the database thread's write transaction
    (ledger/writer.py), among the other writes of its group. How many rows a key has is kept beside them
    (`rate_limit_counts`, changed with every row deleted or added), so an admission costs the same with 10 or
    10,000 requests in its window; a peek (for /v1/usage) counts the rows themselves.

    On SQLite that transaction starts with BEGIN IMMEDIATE, so it holds the database's single write lock from
    its first statement to the commit: requests racing in one process, or in several processes on one file,
    queue there, and none can count before another has recorded.
    On PostgreSQL an admission's first statement locks the key's row, so the same holds per key, across every host.

    The kept count heals: anything that writes the rows without it (a server of a release before revision 0007,
    running beside this one during an upgrade; a hand-made fix) leaves it wrong, and an admission then counts
    the rows again, under the same lock, whenever it cannot be right (expiry would take it below zero, or the
    hit whose expiry makes room is not there), and in any case at a key's first admission in this process and
    once a window after it. So a wrong count holds for one window at most, and never fails a request.
    """

    def __init__(self, writer: DatabaseWriter) -> None:
        self.writer = writer
        # key_id -> the clock (ms) when this process last found the key's kept count equal to its rows. Only the
        # database thread reads and writes it. A count found wrong is corrected but not marked, so the next
        # admission counts again: it finds the correction committed, or (rolled back with its group) makes it anew.
        self._verified_ms: dict[int, int] = {}

    async def admit(self, key_id: int, limit: int, window_ms: int, cost: int = 1, on_admit: OnAdmit | None = None,
                    guard: AdmissionGuard | None = None) -> tuple[bool, WindowState]:
        # Once: the group may be written again item by item, and the places taken stay taken.
        on_admit_once = _once(on_admit) if on_admit is not None else None
        return await self.writer.run(partial(self._admit, key_id, limit, window_ms, cost, on_admit_once, guard),
                                     order=key_id)

    async def peek(self, key_id: int, limit: int, window_ms: int) -> WindowState:
        return await self.writer.run(partial(self._peek, key_id, limit, window_ms), order=key_id)

    def _admit(self, key_id: int, limit: int, window_ms: int, cost: int, on_admit: OnAdmit | None,
               guard: AdmissionGuard | None, transaction: Transaction) -> tuple[bool, WindowState]:
        # The clock read under the lock: recorded in order.
        at_ms = transaction.scalar(LOCK_KEY_AND_READ_CLOCK, key_id=key_id) if transaction.is_postgres else now_ms()
        assert at_ms is not None, f"no api_keys row {key_id}: keys are revoked, never deleted"
        if guard is not None:
            guard.enter(transaction, at_ms=at_ms)  # raising, it is this admission's answer, and nothing is counted
        # Expired hits are never read again; dropping them keeps each key's rows at most its limit, and the
        # rows left are the window's.
        since_ms = at_ms - window_ms
        expired = transaction.execute(DELETE_EXPIRED, key_id=key_id, since_ms=since_ms).rowcount
        kept = transaction.scalar(KEPT_COUNT, key_id=key_id)
        count = (kept or 0) - expired
        verified_ms = self._verified_ms.get(key_id)
        if count < 0 or verified_ms is None or at_ms - verified_ms >= window_ms:
            count = self._recount(transaction, key_id, at_ms, count)
        elif expired:  # at once: whatever is raised from here on, what was deleted is off the count
            transaction.execute_many(set_count(transaction.dialect.name), [{"key_id": key_id, "hits": count}])
        oldest_ms = transaction.scalar(OLDEST, key_id=key_id, since_ms=since_ms)
        state = self._state(transaction, key_id, limit, since_ms, at_ms, count, oldest_ms, cost)
        if state.count + cost > limit and state.freeing_ms is None:
            # Counted more hits than there are (the one whose expiry makes room is missing): counted again.
            count = self._recount(transaction, key_id, at_ms, count)
            state = self._state(transaction, key_id, limit, since_ms, at_ms, count, oldest_ms, cost)
        is_allowed = state.count + cost <= limit
        try:
            if is_allowed and on_admit is not None:
                on_admit(cost)  # raising, it is this admission's answer, and nothing is recorded
        except Exception:
            if guard is not None:
                guard.leave(transaction, is_key_locked=True)
            raise
        if is_allowed:
            transaction.insert(RateLimitHit, [{"key_id": key_id, "at_ms": at_ms}] * cost)
            transaction.execute_many(set_count(transaction.dialect.name), [{"key_id": key_id, "hits": count + cost}])
        elif guard is not None:
            guard.leave(transaction, is_key_locked=True)  # in this transaction: a refusal leaves no claim behind
        return is_allowed, state

    def _recount(self, transaction: Transaction, key_id: int, at_ms: int, kept_count: int) -> int:
        """The key's rows counted (its expired ones are deleted already) and kept as its count; marked verified
        when the kept count was right."""
        count = transaction.scalar(RECOUNT, key_id=key_id)
        transaction.execute_many(set_count(transaction.dialect.name), [{"key_id": key_id, "hits": count}])
        if count == kept_count:
            self._verified_ms[key_id] = at_ms
        else:
            self._verified_ms.pop(key_id, None)
            logger.warning("rate limit: key %d's kept count was %d, but it has %d hits in its window; counted "
                           "again (a server of a release before revision 0007 writing beside this one?)",
                           key_id, kept_count, count)
        return count

    @classmethod
    def _peek(cls, key_id: int, limit: int, window_ms: int, transaction: Transaction) -> WindowState:
        # No key lock: on PostgreSQL another host's admission may delete expired hits between the count and the
        # freeing hit's read (each statement sees what is committed when it starts). Then the rows counted are
        # gone, and the window is counted again, on a later clock.
        for _ in range(PEEK_ATTEMPTS):
            at_ms = transaction.scalar(READ_CLOCK) if transaction.is_postgres else now_ms()
            count, oldest_ms = transaction.one(COUNT, key_id=key_id, since_ms=at_ms - window_ms)
            state = cls._state(transaction, key_id, limit, at_ms - window_ms, at_ms, count, oldest_ms)
            if state.count + 1 <= limit or state.freeing_ms is not None:
                return state
        return state  # still changing under it: without the freeing hit, the limiter says when the oldest leaves

    @staticmethod
    def _state(transaction: Transaction, key_id: int, limit: int, since_ms: int, at_ms: int, count: int,
               oldest_ms: int | None, cost: int = 1) -> WindowState:
        freeing_ms = None
        if count + cost > limit:
            # Room for `cost` comes when the hit at this offset expires (a lowered limit can leave more than
            # `limit` hits, so the offset is not always 0).
            freeing_ms = transaction.scalar(HIT_AT_OFFSET, key_id=key_id, since_ms=since_ms,
                                            offset=count + cost - limit - 1)
        return WindowState(at_ms, count, oldest_ms, freeing_ms)


def _once(on_admit: OnAdmit) -> OnAdmit:
    is_called = False

    def call_once(cost: int) -> None:
        nonlocal is_called
        if not is_called:
            on_admit(cost)
            is_called = True

    return call_once


# Our own script, not the `limits` library's moving window: that one timestamps with each host's clock (skewed
# hosts would disagree), keeps only `limit` entries (a lowered limit forgets hits) and reports no freeing hit.
WINDOW_SCRIPT = """
local window, limit, window_ms, cost = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call('TIME')  -- Redis's clock, the one every host shares
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', window, '-inf', now_ms - window_ms)
local count = redis.call('ZCARD', window)
local function score_at(offset)
  local hit = redis.call('ZRANGE', window, offset, offset, 'WITHSCORES')
  return hit[2] and tonumber(hit[2]) or false
end
local oldest = score_at(0)
if ARGV[4] == '1' then
  local recorded = redis.call('ZSCORE', window, ARGV[5] .. '-1')
  if recorded then  -- the client's retry of a call whose reply was lost: admitted then, not to be counted twice
    return {1, tonumber(recorded), count - cost, score_at(0), false}
  end
end
if count + cost > limit then
  return {0, now_ms, count, oldest, score_at(count + cost - limit - 1)}
end
if ARGV[4] == '1' then
  for i = 1, cost do
    redis.call('ZADD', window, now_ms, ARGV[5] .. '-' .. i)  -- ARGV[5]: random per call, the same on a retry
  end
  redis.call('PEXPIRE', window, window_ms)
end
return {1, now_ms, count, oldest, false}
"""


def make_redis(url: str, timeout_s: float) -> Redis:
    # One retry on a fresh connection (a pooled one is stale after Redis restarts), no more: a Redis that is down
    # makes a prompt 503, not ten back-offs.
    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))


class RedisWindowStorage:
    """The window as one sorted set per key in Redis (unique members scored by admission time in ms), counted
    and added by one Lua script. Redis runs one script at a time, so admissions from every host are serialised
    there; the set expires when the window is empty."""

    def __init__(self, client: Redis, key_prefix: str, writer: DatabaseWriter | None = None) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.writer = writer  # for guards, which are decided in the database
        self.script = client.register_script(WINDOW_SCRIPT)  # EVALSHA, and EVAL again after Redis restarts

    async def admit(self, key_id: int, limit: int, window_ms: int, cost: int = 1, on_admit: OnAdmit | None = None,
                    guard: AdmissionGuard | None = None) -> tuple[bool, WindowState]:
        if guard is not None:  # undone by its owner if the admission is refused: a second trip is no worse than one
            assert self.writer is not None, "a guard needs the database thread"
            await self.writer.run(partial(guard.enter, at_ms=None), order=key_id)
        if on_admit is not None:
            on_admit(cost)  # before the one script call that decides and records: there is no lock to wait for
        return await self._run(key_id, limit, window_ms, cost, is_recording=True)

    async def peek(self, key_id: int, limit: int, window_ms: int) -> WindowState:
        return (await self._run(key_id, limit, window_ms, 1, is_recording=False))[1]

    async def _run(self, key_id: int, limit: int, window_ms: int, cost: int,
                   is_recording: bool) -> tuple[bool, WindowState]:
        allowed, at_ms, count, oldest_ms, freeing_ms = await self.script(
            keys=[f"{self.key_prefix}:window:{key_id}"],
            args=[limit, window_ms, cost, int(is_recording), secrets.token_hex(8)])
        return bool(allowed), WindowState(int(at_ms), int(count), oldest_ms, freeing_ms)


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

    async def hit(self, key_id: int, limit: int, window_s: int, cost: int = 1, on_admit: OnAdmit | None = None,
                  guard: AdmissionGuard | None = None) -> Decision:
        """Admit and record `cost` requests (all or none) if the window has room; otherwise say how long to wait.

        `cost` must be at most `limit`: a larger one could never be admitted. `on_admit(cost)` runs as the
        request is admitted; if it raises, the request is not recorded and the exception comes out of here.
        `guard` (AdmissionGuard) may refuse the request before anything is counted, by raising too.
        """
        assert 1 <= cost <= limit
        asked_at = time.monotonic()  # before the storage read its clock: a full window is never assumed too long
        is_allowed, state = await self.storage.admit(key_id, limit, window_s * 1000, cost, on_admit, guard)
        if not is_allowed:
            if cost == 1 and state.freeing_ms is not None:  # full even for one: nothing fits until a hit expires
                frees_in_s = (state.freeing_ms + window_s * 1000 - state.now_ms) / 1000
                self._full_until[key_id] = (limit, window_s, asked_at + frees_in_s)
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
    """A refusal: none of it was recorded, so what remains is what was there (a request of 3 may be refused
    with 2 left), and Retry-After is when this request's `cost` would fit. A window that changed while it was
    read (a peek on PostgreSQL: SqlWindowStorage._peek) may lack the freeing hit: its oldest, or now, stands in."""
    oldest_ms = state.oldest_ms if state.oldest_ms is not None else state.now_ms
    freeing_ms = state.freeing_ms if state.freeing_ms is not None else oldest_ms
    retry_after_s = max(1, _whole_seconds(freeing_ms + window_ms - state.now_ms))
    reset_s = _whole_seconds(oldest_ms + window_ms - state.now_ms)
    return Decision(False, limit, max(0, limit - state.count), reset_s, retry_after_s)
