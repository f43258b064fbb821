"""Benchmark: admissions per second of the rate limiter alone, on SQLite, PostgreSQL and Redis.

    $ .venv/bin/python bench/limiter.py                  # starts its own PostgreSQL and Redis (tests/servers.py)
    $ .venv/bin/python bench/limiter.py --seconds 10 --concurrency 32

One process, one event loop, `--concurrency` tasks each calling `SlidingWindowLimiter.hit` in a loop for
`--seconds`, as one server process's requests would. Two loads: "1000 keys" (each hit on a random key of
1000, never refused: independent keys) and "1 key" (every hit on the same key: admissions of one key queue
behind its lock). The database servers run on the same cores as the benchmark. Also counts what one
admission alone sends, as the database saw it: SQL statements with BEGIN and COMMIT (each a round trip on
PostgreSQL; SQLite's trace callback, PostgreSQL's pg_stat_statements), or Redis calls. Admissions that arrive
together share their transaction in the database thread (ledger/writer.py), as in the server.
"""

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sqlalchemy import event, text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402

from db import make_engine, make_sessionmaker, migrate  # noqa: E402
from ledger.keys import create_key  # noqa: E402
from ledger.ratelimit import RedisWindowStorage, SlidingWindowLimiter, SqlWindowStorage, WindowStorage, make_redis  # noqa: E402
from ledger.writer import DatabaseWriter  # noqa: E402
from servers import PostgresServer, RedisServer  # noqa: E402  (the tests' throwaway servers)

KEYS = 1000
NEVER_REACHED = 10**9


async def make_keys(engine: AsyncEngine, count: int) -> list[int]:
    await migrate(engine)
    async with make_sessionmaker(engine)() as session:
        ids = [(await create_key(session, f"bench{i}@example.com", NEVER_REACHED, 60))[1].id for i in range(count)]
        await session.commit()
    return ids


def count_sqlite_statements(writer: DatabaseWriter) -> Callable[[], Awaitable[int]]:
    """Statements the writer's SQLite connection has run so far, BEGIN and COMMIT included."""
    counter = [0]

    def bump(_statement: str) -> None:
        counter[0] += 1

    event.listen(writer.engine, "connect", lambda connection, _record: connection.set_trace_callback(bump))

    async def count() -> int:
        return counter[0]

    return count


def count_postgres_statements(engine: AsyncEngine) -> Callable[[], Awaitable[int]]:
    """Statements the database has run so far (pg_stat_statements, BEGIN and COMMIT included), less this count's."""
    async def count() -> int:
        async with engine.connect() as connection:
            calls = await connection.scalar(text("SELECT sum(calls) FROM pg_stat_statements s JOIN pg_database d "
                                                 "ON d.oid = s.dbid WHERE d.datname = current_database()"))
            await connection.rollback()
        return int(calls or 0)

    return count


async def run_load(limiter: SlidingWindowLimiter, key_ids: list[int], seconds: float, concurrency: int) -> dict:
    latencies_ms: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            decision = await limiter.hit(random.choice(key_ids), NEVER_REACHED, 60)
            assert decision.allowed
            latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies_ms, n=100)
    return {"admissions_per_s": len(latencies_ms) / elapsed, "p50_ms": quantiles[49], "p99_ms": quantiles[98]}


async def measure(name: str, storage: WindowStorage, key_ids: list[int], args: argparse.Namespace,
                  statements: Callable[[], Awaitable[int]] | None) -> None:
    limiter = SlidingWindowLimiter(storage)
    await run_load(limiter, key_ids, 1, args.concurrency)  # warm the connections
    if statements is not None:
        before = await statements()
        await limiter.hit(key_ids[0], NEVER_REACHED, 60)
        # Less the counting query itself, with its BEGIN and ROLLBACK, on PostgreSQL
        per_admission = f"{await statements() - before - (3 if 'PostgreSQL' in name else 0)} statements, BEGIN and COMMIT included"
    else:
        per_admission = "1 EVALSHA (one script)"
    for load, keys in (("1000 keys", key_ids), ("1 key", key_ids[:1])):
        result = await run_load(limiter, keys, args.seconds, args.concurrency)
        print(f"| {name} | {load} | {result['admissions_per_s']:,.0f} | {result['p50_ms']:.1f} | "
              f"{result['p99_ms']:.1f} | {per_admission} |", flush=True)


def started_writer(database_url: str) -> DatabaseWriter:
    writer = DatabaseWriter(database_url, timeout_s=30)
    writer.start()
    return writer


async def main(args: argparse.Namespace) -> None:
    model = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d}, {model.strip()}, {args.concurrency} concurrent callers, "
          f"{args.seconds:g} s per row\n")
    print("| storage | load | admissions/s | p50 ms | p99 ms | per admission |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite:///{tmp}/bench.db"
        sqlite = make_engine(sqlite_url, timeout_s=30)
        key_ids = await make_keys(sqlite, KEYS)
        writer = started_writer(sqlite_url)
        await measure("SQLite (WAL, synchronous=NORMAL)", SqlWindowStorage(writer), key_ids, args,
                      count_sqlite_statements(writer))
        await writer.stop()
        await sqlite.dispose()

    for label, options in (("PostgreSQL 15 (defaults: commits fsync'd)", {}),
                           ("PostgreSQL 15 (synchronous_commit=off)", {"synchronous_commit": "off"})):
        postgres = PostgresServer({**options, "shared_preload_libraries": "pg_stat_statements"}).start()
        try:
            database_url = postgres.create_database()
            engine = make_engine(database_url, timeout_s=30, pool_size=2)
            key_ids = await make_keys(engine, KEYS)
            async with engine.begin() as connection:
                await connection.execute(text("CREATE EXTENSION pg_stat_statements"))
            writer = started_writer(database_url)
            await measure(label, SqlWindowStorage(writer), key_ids, args, count_postgres_statements(engine))
            await writer.stop()
            await engine.dispose()
        finally:
            postgres.remove()

    redis_server = RedisServer().start()
    try:
        redis = make_redis(redis_server.url, timeout_s=30)
        await measure("Redis 7 (Lua script)", RedisWindowStorage(redis, "bench"), list(range(1, KEYS + 1)), args, None)
        await redis.aclose()
    finally:
        redis_server.remove()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured load")
    parser.add_argument("--concurrency", type=int, default=16, help="callers admitting at once")
    asyncio.run(main(parser.parse_args()))
