"""The database: three tables (keys, the request log, the rate limiter's window) and the async engine.

Times are integer milliseconds since the Unix epoch, so bucketing (`(t - start) / width`) is the same
integer division in every SQL dialect.
"""

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request

from sqlalchemy import BigInteger, ForeignKey, Index, String, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Base(DeclarativeBase):
    pass


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

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))  # None when no valid key was sent
    endpoint: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    status_code: Mapped[int]
    latency_ms: Mapped[float]
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    error_code: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the X-Request-ID it was answered with

    __table_args__ = (Index("ix_request_log_key_time", "key_id", "created_at_ms"),)


# Admitted /v1/classify requests still inside their key's window: the sliding-window limiter's state.
class RateLimitHit(Base):
    __tablename__ = "rate_limit_hits"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    at_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_rate_limit_hits_key_time", "key_id", "at_ms"),)


def make_engine(database_url: str, timeout_s: float) -> AsyncEngine:
    """An async engine on the SQLite file of `database_url` (aiosqlite), waiting up to `timeout_s` for its lock."""
    url = make_url(database_url).set(drivername="sqlite+aiosqlite")
    engine = create_async_engine(url, connect_args={"timeout": timeout_s}, pool_size=8, max_overflow=8)
    _use_explicit_sqlite_transactions(engine)
    return engine


def _use_explicit_sqlite_transactions(engine: AsyncEngine) -> None:
    # The sqlite3 driver opens transactions lazily and always DEFERRED; a limiter that counts then inserts
    # needs BEGIN IMMEDIATE (the write lock first), so the driver is told to keep out and we emit BEGIN ourselves.
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # a commit survives a killed process; fsync at checkpoints
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        is_immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if is_immediate else "BEGIN")


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that holds the database's write lock from its first statement (SQLite: BEGIN IMMEDIATE)."""
    async with engine.connect() as connection:
        await connection.execution_options(sqlite_immediate=True)
        async with connection.begin():
            yield connection


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    # Routes open short `session.begin()` blocks: no connection is held while a request waits for the model.
    async with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def create_tables(engine: AsyncEngine) -> None:
    # Under the write lock, so two workers starting at once do not both try to create the same table.
    async with write_transaction(engine) as connection:
        await connection.run_sync(Base.metadata.create_all)


async def ping(engine: AsyncEngine) -> None:
    """Raises unless the database can be written now: reads alone would pass while writers are locked out."""
    async with write_transaction(engine) as connection:
        await connection.execute(select(ApiKey.id).limit(1))
