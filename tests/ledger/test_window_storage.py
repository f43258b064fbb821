"""The storage contract every window storage keeps (SQLite, PostgreSQL, Redis): `admit` records `cost` hits
all or none, and reports the window as it was before (count, oldest hit, and, when full, the hit whose
expiry makes room); `peek` records nothing. Called directly on the real backends, outside any server."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import key_id, make_key, query, sync_engine
from db import make_engine
from ledger.ratelimit import (COUNT, KEPT_COUNT, RedisWindowStorage, SlidingWindowLimiter, SqlWindowStorage,
                              WindowStorage, _full, make_redis)
from ledger.writer import DatabaseWriter, Transaction

WINDOW_MS = 60_000


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def storage_factory(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Callable[[], WindowStorage], int]:
    """Makes the storage inside the test's event loop; the key's id (a real api_keys row for the SQL ones)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        return (lambda: RedisWindowStorage(make_redis(url, timeout_s=5), f"contract-{tmp_path.name}")), 1
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres").create_database()
    else:
        database_url = f"sqlite:///{tmp_path / 'window.db'}"
    key = make_key(database_url)
    return (lambda: SqlWindowStorage(started_writer(database_url))), key_id(database_url, key)


def started_writer(database_url: str) -> DatabaseWriter:
    writer = DatabaseWriter(database_url, timeout_s=5)
    writer.start()
    return writer


def run(storage_factory: tuple[Callable[[], WindowStorage], int],
        steps: Callable[[WindowStorage, int], Awaitable[None]]) -> None:
    make, key = storage_factory

    async def go() -> None:
        storage = make()
        try:
            await steps(storage, key)
        finally:
            if isinstance(storage, SqlWindowStorage):
                await storage.writer.stop()
            else:
                await storage.client.aclose()

    asyncio.run(go())


def test_cost_is_admitted_all_or_none_and_the_state_is_what_came_before(storage_factory):
    async def steps(storage: WindowStorage, key: int) -> None:
        allowed, first = await storage.admit(key, 5, WINDOW_MS, cost=3)
        assert allowed and (first.count, first.oldest_ms, first.freeing_ms) == (0, None, None)
        time.sleep(0.01)  # the next hits get a later millisecond
        allowed, second = await storage.admit(key, 5, WINDOW_MS, cost=3)  # 3 + 3 > 5: none of them
        assert not allowed and (second.count, second.oldest_ms) == (3, first.now_ms)
        assert second.freeing_ms == first.now_ms  # offset 3 + 3 - 5 - 1 = 0
        allowed, third = await storage.admit(key, 5, WINDOW_MS, cost=2)
        assert allowed and third.count == 3 and third.now_ms > first.now_ms
        peeked = await storage.peek(key, 5, WINDOW_MS)
        assert (peeked.count, peeked.oldest_ms) == (5, first.now_ms)
        assert (await storage.peek(key, 5, WINDOW_MS)).count == 5  # peeking recorded nothing

    run(storage_factory, steps)


def test_a_lowered_limit_frees_room_at_the_right_hit(storage_factory):
    """Hits at t1, t1, t1, t2, t2 and the limit lowered to 2: room for 2 more comes only when the hit at
    offset 5 + 2 - 2 - 1 = 4 (a t2 one) expires; room for 1 at offset 3 (also t2); a limit of 4 frees at t1."""
    async def steps(storage: WindowStorage, key: int) -> None:
        _, at_t1 = await storage.admit(key, 5, WINDOW_MS, cost=3)
        time.sleep(0.01)
        _, at_t2 = await storage.admit(key, 5, WINDOW_MS, cost=2)
        t1, t2 = at_t1.now_ms, at_t2.now_ms
        for limit, cost, freeing in ((2, 2, t2), (2, 1, t2), (4, 1, t1), (4, 2, t1)):
            allowed, state = await storage.admit(key, limit, WINDOW_MS, cost)
            assert not allowed and state.count == 5 and state.freeing_ms == freeing, (limit, cost, state)

    run(storage_factory, steps)


def test_admissions_stay_exact_as_hits_come_and_go(storage_factory):
    """Hits expiring a few at a time, refusals, costs of several, and callers that raise after the storage has
    dropped expired hits: SQL storages keep each key's count of hits beside them (what an admission reads
    instead of counting), and it stays the number of rows; once all have expired, an admission sees none."""
    async def steps(storage: WindowStorage, key: int) -> None:
        window_ms, limit = 300, 7
        for step in range(50):
            def give_up_now_and_then(cost: int) -> None:
                if step % 5 == 0:
                    raise RuntimeError("the caller gave up")

            try:
                allowed, state = await storage.admit(key, limit, window_ms, 1 + step % 3, on_admit=give_up_now_and_then)
                assert allowed == (state.count + 1 + step % 3 <= limit) and 0 <= state.count <= limit
            except RuntimeError:
                pass
            if isinstance(storage, SqlWindowStorage):
                kept, rows = await storage.writer.run(lambda transaction: (
                    transaction.scalar(KEPT_COUNT, key_id=key), transaction.one(COUNT, key_id=key, since_ms=-1)[0]))
                assert (kept or 0) == rows, step  # no row until its first hit
            await asyncio.sleep(0.015)
        await asyncio.sleep(window_ms / 1000)
        allowed, after = await storage.admit(key, limit, window_ms)
        assert allowed and after.count == 0

    run(storage_factory, steps)


def test_hits_leave_the_window_exactly_when_it_has_passed(storage_factory):
    async def steps(storage: WindowStorage, key: int) -> None:
        _, first = await storage.admit(key, 1, 200)
        while (state := await storage.peek(key, 1, 200)).now_ms < first.now_ms + 200:
            assert state.count == 1  # inside (now - 200 ms, now]: counted
            await asyncio.sleep(0.02)
        assert state.count == 0 and (await storage.admit(key, 1, 200))[0]

    run(storage_factory, steps)


def test_on_postgresql_a_hit_is_stamped_after_its_wait_for_the_key_lock(postgres):
    """A hit stamped when the admission started, not when it got the lock, would leave the window early."""
    database_url = postgres.create_database()
    key = key_id(database_url, make_key(database_url))

    async def go() -> None:
        holder, storage = make_engine(database_url, timeout_s=5), SqlWindowStorage(started_writer(database_url))
        try:
            async with holder.begin() as connection:
                await connection.execute(text("SELECT id FROM api_keys WHERE id = :id FOR NO KEY UPDATE"), {"id": key})
                admission = asyncio.create_task(storage.admit(key, 5, WINDOW_MS))
                await asyncio.sleep(1.0)  # the admission waits for this transaction's lock
                released_ms = await connection.scalar(text("SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)"))
            allowed, state = await admission
            assert allowed and state.now_ms >= released_ms
        finally:
            await holder.dispose()
            await storage.writer.stop()

    asyncio.run(go())


def test_on_redis_a_retried_script_call_is_not_counted_twice(redis_server, tmp_path):
    """redis-py retries a call whose reply was lost; the script must know its own hits when it runs again."""
    async def go() -> None:
        storage = RedisWindowStorage(make_redis(redis_server.url, timeout_s=5), f"retry-{tmp_path.name}")
        try:
            window = [f"retry-{tmp_path.name}:window:1"]
            first = await storage.script(keys=window, args=[5, WINDOW_MS, 2, 1, "same-call"])
            again = await storage.script(keys=window, args=[5, WINDOW_MS, 2, 1, "same-call"])  # as a retry sends it
            assert first[0] == again[0] == 1 and again[2] == 0  # admitted once; the window held nothing before
            assert (await storage.peek(1, 5, WINDOW_MS)).count == 2
        finally:
            await storage.client.aclose()

    asyncio.run(go())


def kept_and_rows(storage: SqlWindowStorage, key: int) -> Awaitable[tuple[int | None, int]]:
    return storage.writer.run(lambda transaction: (transaction.scalar(KEPT_COUNT, key_id=key),
                                                   transaction.one(COUNT, key_id=key, since_ms=-1)[0]))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_kept_count_that_cannot_be_right_is_counted_again_at_once(request, tmp_path, backend):
    """Rows written without the kept count (a server from before revision 0007): deleted, the hit whose expiry
    makes room is missing; expired, the count would go below zero. Each admission that meets it counts the
    rows again and decides on them, within the window (not a window later) and without failing."""
    database_url = (request.getfixturevalue("postgres").create_database() if backend == "postgresql"
                    else f"sqlite:///{tmp_path / 'window.db'}")
    key = key_id(database_url, make_key(database_url))
    clock = "floor(extract(epoch FROM clock_timestamp()) * 1000)" if backend == "postgresql" else str(time.time_ns() // 10**6)

    async def steps(storage: SqlWindowStorage) -> None:
        assert (await storage.admit(key, 5, WINDOW_MS, cost=3))[0]
        query(database_url, "DELETE FROM rate_limit_hits WHERE key_id = :id", id=key)  # the count says 3
        allowed, state = await storage.admit(key, 2, WINDOW_MS)  # a lowered limit: the hit at offset 1 is sought
        assert allowed and state.count == 0
        assert await kept_and_rows(storage, key) == (1, 1)
        for _ in range(4):  # about to expire, and uncounted
            query(database_url, f"INSERT INTO rate_limit_hits (key_id, at_ms) VALUES (:id, {clock} - :age)", id=key,
                  age=WINDOW_MS - 300)
        await asyncio.sleep(0.5)
        allowed, state = await storage.admit(key, 2, WINDOW_MS)  # 4 expired against a count of 1
        assert allowed and state.count == 1
        assert await kept_and_rows(storage, key) == (2, 2)

    async def go() -> None:
        storage = SqlWindowStorage(started_writer(database_url))
        try:
            await steps(storage)
        finally:
            await storage.writer.stop()

    asyncio.run(go())


class DeletingAfterTheCount:
    """The database thread's transaction, with another host's admission deleting this key's hits (expired, by
    a later clock) just after a peek has counted them: what a peek, which takes no key lock, may meet."""

    def __init__(self, transaction: Transaction, database_url: str, key: int) -> None:
        self.transaction = transaction
        self.database_url = database_url
        self.key = key

    def __getattr__(self, name: str) -> object:
        return getattr(self.transaction, name)

    def one(self, statement: object, **params: object) -> tuple:
        found = self.transaction.one(statement, **params)
        if statement is COUNT and found[0] > 0:
            engine = sync_engine(self.database_url)
            try:
                with engine.begin() as connection:
                    connection.execute(text("DELETE FROM rate_limit_hits WHERE key_id = :id"), {"id": self.key})
            finally:
                engine.dispose()
        return found


def test_on_postgresql_a_peek_whose_counted_hits_vanish_counts_again(postgres):
    """It looked for the freeing hit among rows that were gone, and /v1/usage failed on an assertion."""
    database_url = postgres.create_database()
    key = key_id(database_url, make_key(database_url))

    async def go() -> None:
        storage = SqlWindowStorage(started_writer(database_url))
        try:
            assert (await storage.admit(key, 3, WINDOW_MS, cost=3))[0]
            state = await storage.writer.run(lambda transaction: storage._peek(
                key, 3, WINDOW_MS, DeletingAfterTheCount(transaction, database_url, key)))
            assert (state.count, state.oldest_ms, state.freeing_ms) == (0, None, None)
            assert (await SlidingWindowLimiter(storage).peek(key, 3, WINDOW_MS // 1000)).remaining == 3
        finally:
            await storage.writer.stop()

    asyncio.run(go())


def test_a_refusal_read_without_its_freeing_hit_still_says_when_to_retry():
    """What a peek returns when the window kept changing under it: the oldest hit stands in for the freeing one."""
    from ledger.ratelimit import WindowState

    decision = _full(3, WINDOW_MS, WindowState(now_ms=100_000, count=3, oldest_ms=70_000, freeing_ms=None))
    assert (decision.allowed, decision.remaining, decision.reset_s, decision.retry_after_s) == (False, 0, 30, 30)
