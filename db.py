"""The database: eight tables (keys, the request log, its per-minute, hour and day rollups and the backfill
of those after an upgrade, the rate limiter's window and its count, idempotency keys, readiness's one row),
the engines on SQLite (aiosqlite, or sqlite3 for the reading and writing threads) or PostgreSQL (psycopg 3),
and bringing a database's schema to Alembic's head.

Times are integer milliseconds since the Unix epoch, so bucketing (`(t - start) / width`) is the same
integer division in every SQL dialect.

A request's waits for the database share one deadline (`waiting_until`, which the request log's middleware
opens with DB_TIMEOUT_S): every transaction it begins waits for locks only as long as that leaves.
"""

import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (BigInteger, Connection, Engine, ForeignKey, Index, Integer, LargeBinary, String, Text,
                        UniqueConstraint, create_engine, event, false, insert, inspect, text, update)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Base(DeclarativeBase):
    pass


# 64-bit ids for the tables that grow with traffic (a 32-bit id runs out after 2^31 requests); on SQLite an
# INTEGER PRIMARY KEY already is 64-bit, and only that exact type is the auto-numbered rowid.
BIG_ID = BigInteger().with_variant(Integer, "sqlite")


# An API key. Only its SHA-256 and a short display prefix are stored: the key itself is shown once, at creation.
class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256 of the whole key
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # "sk-" and the key's first characters
    email: Mapped[str] = mapped_column(String(320))
    rate_limit: Mapped[int]  # requests admitted ...
    window_s: Mapped[int]  # ... in any window of this many seconds
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger)


# One row per /v1 request, whatever its outcome, committed before the response is sent.
class RequestLog(Base):
    __tablename__ = "request_log"

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))  # None when no valid key was sent
    endpoint: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    status_code: Mapped[int]
    latency_ms: Mapped[float]
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    error_code: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the X-Request-ID it was answered with
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)  # of the model that answered it
    # An answer replayed for a repeated Idempotency-Key: no model ran, nothing was counted, /v1/usage skips it.
    replayed: Mapped[bool] = mapped_column(server_default=false())  # no Python default: the database thread binds none
    images: Mapped[int | None] = mapped_column(nullable=True)  # the images its body carried; None before 0006

    __table_args__ = (Index("ix_request_log_key_time", "key_id", "created_at_ms"),)


LATENCY_BUCKETS = 32  # ledger/rollups.py: the histogram's bounds


# A key's requests to one endpoint in one minute, hour or day, counted by outcome: what /v1/usage reads
# (ledger/rollups.py writes them with the log rows, in the same transaction).
class UsageRollup(Base):
    __tablename__ = "usage_rollups"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    width_s: Mapped[int] = mapped_column(primary_key=True)  # 60, 3600 or 86400
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # a multiple of width_s * 1000
    endpoint: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)  # "" for none: a key has no NULLs
    requests: Mapped[int]
    images: Mapped[int]
    succeeded: Mapped[int]  # 200
    client_errors: Mapped[int]  # 4xx but 429
    rate_limited: Mapped[int]  # 429
    server_errors: Mapped[int]  # 5xx
    latency_ms_sum: Mapped[float]
    # Requests per latency bucket (ledger/rollups.py: LATENCY_EDGES_MS): h00 under 1 ms, ..., h31 from 32.8 s on.
    locals().update({f"h{index:02d}": mapped_column(Integer, nullable=False) for index in range(LATENCY_BUCKETS)})

    # Pruned by when each ends, through an index on that expression: one on start_ms would tempt PostgreSQL's
    # generic plans for /v1/usage's ranges away from the primary key. On SQLite, rows are kept in key order
    # (WITHOUT ROWID), so a key's range is read in one sweep.
    __table_args__ = (Index("ix_usage_rollups_end", text("(start_ms + width_s * 1000)")), {"sqlite_with_rowid": False})


# A key whose requests logged before revision 0006 are still being counted into its rollups, newest first, a
# batch at a time (ledger/backfill.py): those before frontier_ms are not counted yet, so /v1/usage covers it
# only from there on. The row goes once all are counted.
class RollupBackfill(Base):
    __tablename__ = "rollup_backfill"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True, autoincrement=False)
    frontier_ms: Mapped[int] = mapped_column(BigInteger)
    oldest_ms: Mapped[int] = mapped_column(BigInteger)  # the key's oldest row at the revision
    last_id: Mapped[int] = mapped_column(BigInteger)  # the log's last id then: later rows were counted as logged


# Admitted /v1/classify requests still inside their key's window: the sliding-window limiter's state.
class RateLimitHit(Base):
    __tablename__ = "rate_limit_hits"

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    at_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_rate_limit_hits_key_time", "key_id", "at_ms"),)


# How many `rate_limit_hits` rows each key has, kept with them by every admission (ledger/ratelimit.py), so an
# admission reads one number instead of counting its window's rows (10,000 of them took 0.6 ms).
class RateLimitCount(Base):
    __tablename__ = "rate_limit_counts"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True, autoincrement=False)
    hits: Mapped[int] = mapped_column(BigInteger)


# An Idempotency-Key sent with this API key: claimed while its first request runs (no status_code yet), then
# that request's 200 answer, replayed to repeats until it expires (ledger/idempotency.py).
class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of what the request asked
    owner: Mapped[str] = mapped_column(String(32))  # random per claim: only its request completes or releases it
    status_code: Mapped[int | None]
    response_headers: Mapped[str | None] = mapped_column(Text)  # JSON: the headers that describe the body
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    model_version: Mapped[str | None] = mapped_column(String(64))  # of the model that answered, for replays' log rows
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    expires_at_ms: Mapped[int] = mapped_column(BigInteger)  # a claim's lease, then the answer's IDEMPOTENCY_TTL_S

    __table_args__ = (UniqueConstraint("key_id", "idempotency_key", name="uq_idempotency_keys_key"),
                      Index("ix_idempotency_keys_expires", "expires_at_ms"))


# One row, rewritten by every /readyz: only a committed write shows that the database takes writes now (SQLite
# writes nothing to disk for a transaction rolled back, so a full disk passes anything less). One row, so
# the table never grows.
class ReadinessCheck(Base):
    __tablename__ = "readiness_check"

    id: Mapped[int] = mapped_column(primary_key=True)
    checked_at_ms: Mapped[int] = mapped_column(BigInteger)


class WaitBudget:
    """How long a request may still wait for the database, all its transactions together: until `deadline`
    (time.monotonic()), which moves on while the request waits for something else (`paused`)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.deadline += time.monotonic() - started


# The budget of the request being served; tasks it starts, SQLAlchemy's greenlets and the reading threads
# (ledger/reader.py) see it too.
wait_budget: ContextVar[WaitBudget | None] = ContextVar("database_wait_budget", default=None)


@contextmanager
def waiting_until(deadline: float | None) -> Iterator[WaitBudget | None]:
    """Transactions begun in the block wait for locks until `deadline` (time.monotonic()) at most, all of them
    together; None: each waits up to the engine's timeout, as outside requests (start-up, the CLI)."""
    budget = WaitBudget(deadline) if deadline is not None else None
    token = wait_budget.set(budget)
    try:
        yield budget
    finally:
        wait_budget.reset(token)


@contextmanager
def not_waiting_for_the_database() -> Iterator[None]:
    """The block waits for something else (a body arriving, the model): its time is not the request's
    database wait, so it does not use up the budget."""
    budget = wait_budget.get()
    if budget is None:
        yield
        return
    with budget.paused():
        yield


# A transaction's lock wait is bounded anew only when its due bound is this far from the one in force, so most
# transactions need no extra statement; a request may so wait this much past its deadline.
WAIT_BOUND_SLACK_MS = 100


def lock_wait_ms(timeout_s: float, deadline: float | None) -> int:
    """The longest a transaction beginning now may wait for a lock: until `deadline` (time.monotonic()), and
    never past `timeout_s`; `timeout_s` when there is no deadline."""
    default_ms = int(timeout_s * 1000)
    return default_ms if deadline is None else max(0, min(default_ms, int((deadline - time.monotonic()) * 1000)))


def _wait_bound_ms(timeout_s: float) -> int:
    """The longest the transaction beginning now may wait for a lock: the rest of the request's budget."""
    budget = wait_budget.get()
    return lock_wait_ms(timeout_s, budget.deadline if budget is not None else None)


def make_engine(database_url: str, timeout_s: float, pool_size: int = 10, max_overflow: int = 10) -> AsyncEngine:
    """An async engine on `database_url`, whose calls wait up to `timeout_s` for a lock or a connection, and
    for locks no longer than the request's `wait_budget` leaves."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        engine = create_async_engine(url.set(drivername="postgresql+psycopg"), pool_size=pool_size,
                                     max_overflow=max_overflow, pool_timeout=timeout_s,
                                     connect_args=_postgres_connect_args(timeout_s))
        _bound_postgres_lock_waits(engine.sync_engine, timeout_s)
        return engine
    engine = create_async_engine(url.set(drivername="sqlite+aiosqlite"), connect_args={"timeout": timeout_s},
                                 pool_size=8, max_overflow=8)
    _configure_sqlite_connections(engine.sync_engine, timeout_s)
    _use_explicit_sqlite_transactions(engine.sync_engine, timeout_s)
    return engine


def make_writer_engine(database_url: str, timeout_s: float) -> Engine:
    """A synchronous engine on `database_url` whose connections are set up as make_engine's are, for the one
    thread that writes (ledger/writer.py): it manages its transactions and lock waits itself."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        return create_engine(url.set(drivername="postgresql+psycopg"), poolclass=NullPool,
                             connect_args=_postgres_connect_args(timeout_s))
    engine = create_engine(url.set(drivername="sqlite+pysqlite"), poolclass=NullPool, connect_args={"timeout": timeout_s})
    _configure_sqlite_connections(engine, timeout_s)
    return engine


def make_reader_engine(database_url: str, timeout_s: float, threads: int) -> Engine:
    """A synchronous engine on `database_url` for the threads that read (ledger/reader.py), a connection each,
    whose transactions begin and bound their lock waits as make_engine's do."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        # pre-ping: a pooled connection that a restart of PostgreSQL closed is replaced before the read, not
        # found out by it (a 503 for the first /v1/usage once PostgreSQL is back).
        engine = create_engine(url.set(drivername="postgresql+psycopg"), pool_size=threads, max_overflow=0,
                               pool_timeout=timeout_s, pool_pre_ping=True,
                               connect_args=_postgres_connect_args(timeout_s))
        _bound_postgres_lock_waits(engine, timeout_s)
        return engine
    # check_same_thread: a connection is used by one thread at a time, not always the one that opened it.
    engine = create_engine(url.set(drivername="sqlite+pysqlite"), pool_size=threads, max_overflow=0,
                           pool_timeout=timeout_s, connect_args={"timeout": timeout_s, "check_same_thread": False})
    _configure_sqlite_connections(engine, timeout_s)
    _use_explicit_sqlite_transactions(engine, timeout_s)
    return engine


def _postgres_connect_args(timeout_s: float) -> dict[str, Any]:
    # A lock wait (a key's admission queue) or a connection attempt longer than the timeout is a 503.
    return {"connect_timeout": max(2, math.ceil(timeout_s)), "options": f"-c lock_timeout={int(timeout_s * 1000)}"}


def _bound_postgres_lock_waits(engine: Engine, timeout_s: float) -> None:
    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        bound_ms = _wait_bound_ms(timeout_s)
        if bound_ms < timeout_s * 1000 - WAIT_BOUND_SLACK_MS:  # a request that has waited already
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, bound_ms)}")  # 0 would mean no bound


def _configure_sqlite_connections(engine: Engine, timeout_s: float) -> None:
    # The sqlite3 driver opens transactions lazily and always DEFERRED; a limiter that counts then inserts
    # needs BEGIN IMMEDIATE (the write lock first), so the driver is told to keep out and we emit BEGIN ourselves.
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _use_wal(cursor, timeout_s)  # readers never wait for the writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # a commit survives a killed process; fsync at checkpoints
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def _use_wal(cursor: Any, timeout_s: float) -> None:
    """Switches a new database file to WAL, waiting up to `timeout_s` for the lock that takes. SQLite does not
    wait for it by itself: a switch that meets another connection's transaction is refused at once ("database
    is locked"), and a connection left in the old mode then deadlocks with the next one's switch: seen when
    several servers start together on a new file. A mode it cannot switch for another reason (a read-only file)
    is answered back at once, and left to the first write to report."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            mode = cursor.fetchone()[0]
        except Exception as exc:  # sqlite3's OperationalError, or the async driver's adaptation of it
            if "database is locked" not in str(exc):
                raise
            mode = None
        if mode is not None or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _use_explicit_sqlite_transactions(engine: Engine, timeout_s: float) -> None:
    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # SQLite's busy timeout, how long a writer waits for the lock, belongs to the connection: it is set
        # for this transaction when the one in force is off by more than the slack.
        bound_ms = _wait_bound_ms(timeout_s)
        info = connection.connection.info  # lives as long as the sqlite3 connection
        if abs(info.get("busy_timeout_ms", timeout_s * 1000) - bound_ms) > WAIT_BOUND_SLACK_MS:
            connection.exec_driver_sql(f"PRAGMA busy_timeout = {bound_ms}")
            info["busy_timeout_ms"] = bound_ms
        is_immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if is_immediate else "BEGIN")


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that holds the database's write lock from its first statement (SQLite: BEGIN IMMEDIATE;
    PostgreSQL has no such lock: its writers lock the rows they need, as the limiter locks its key's row)."""
    async with engine.connect() as connection:
        await connection.execution_options(sqlite_immediate=True)
        async with connection.begin():
            yield connection


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
INITIAL_REVISION = "0001"
# The columns of the tables made by `metadata.create_all` before Alembic came: such a database is at 0001.
PRE_ALEMBIC_TABLES = {
    "api_keys": {"id", "key_hash", "prefix", "email", "rate_limit", "window_s", "created_at_ms", "revoked_at_ms"},
    "request_log": {"id", "key_id", "endpoint", "method", "status_code", "latency_ms", "created_at_ms", "error_code"},
    "rate_limit_hits": {"id", "key_id", "at_ms"},
}
MIGRATION_LOCK_ID = 0x636C6173  # any constant: PostgreSQL's advisory lock that queues concurrent migrations


class ForeignSchemaError(RuntimeError):
    """The database has tables of our names that this server did not make: it will not touch them."""


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config(Path(__file__).resolve().parent / "alembic.ini")
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection  # migrations/env.py runs on it
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Brings the database to Alembic's head, in one transaction that holds the write lock (SQLite) or an
    advisory lock (PostgreSQL): several servers starting at once migrate one after another."""
    async with write_transaction(engine) as connection:
        if connection.dialect.name == "postgresql":
            # Waiting for another server's migration is not a request's lock wait: no DB_TIMEOUT_S here.
            await connection.execute(text("SET LOCAL lock_timeout = 0"))
            await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        await connection.run_sync(_upgrade_to_head)


def _upgrade_to_head(connection: Connection) -> None:
    config = alembic_config(connection)
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables and tables & PRE_ALEMBIC_TABLES.keys():
        _check_pre_alembic_schema(connection)
        command.stamp(config, INITIAL_REVISION)
    command.upgrade(config, "head")


def _check_pre_alembic_schema(connection: Connection) -> None:
    inspector = inspect(connection)
    for table, expected in PRE_ALEMBIC_TABLES.items():
        found = {column["name"] for column in inspector.get_columns(table)} if inspector.has_table(table) else set()
        if found != expected:
            raise ForeignSchemaError(f"The database's table {table!r} has columns {sorted(found)}, not "
                                     f"{sorted(expected)}: it was not made by this server, so it is not migrated; "
                                     "use another DATABASE_URL.")


async def ping(engine: AsyncEngine) -> None:
    """Raises unless the database takes a write now (locked, full, read-only or unreachable: it does not), by
    committing one: reads alone would pass while every request's log row fails."""
    async with write_transaction(engine) as connection:
        checked = await connection.execute(update(ReadinessCheck).values(checked_at_ms=now_ms()))
        if checked.rowcount == 0:  # someone deleted the row
            await connection.execute(insert(ReadinessCheck).values(id=1, checked_at_ms=now_ms()))
