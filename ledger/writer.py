"""The database thread: one thread, on a connection of its own, makes the request path's writes in groups.

    run(job, order)     a function of the open transaction (an admission: ratelimit.py), run in the next group
    run_soon(job, order)  the same, handed over at once, its future awaited later (idempotency.py)
    insert(table, row)  a row (the request log's: request_log.py), inserted with the group's other rows of its table

As the request log alone did before: a request hands over one item and awaits one future. The thread takes
every item waiting when it is free and commits them in one transaction, so under load one transaction serves
several requests, and SQLite's write lock is taken once for the group instead of twice per request. On
PostgreSQL the group shares its BEGIN, COMMIT and INSERTs; its admissions lock their keys' rows in key order
(`order`), so two hosts' groups never wait for each other in a circle.

A group waits for locks no longer than its most hurried request may (db.wait_budget); with none left, it still
tries once. A database that cannot be used just now (operations/errors.is_database_unavailable) fails the whole group with
its error, a 503 each; any other database error makes the group be written item by item, so that one bad item
fails only its own request. An exception a job raises itself, not the database, is that job's answer alone:
the job has written nothing it needs kept, and the rest of the group goes on.

Statements are SQLAlchemy Core, compiled once for the database's dialect and run on the driver's cursor:
through SQLAlchemy's Connection, a transaction of one admission and one log row cost 0.2 ms of CPU here; on the
driver, 0.04 ms.
"""

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Executable, Insert, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection

from db import WAIT_BOUND_SLACK_MS, Base, lock_wait_ms, make_writer_engine, wait_budget
from operations.errors import is_database_unavailable

logger = logging.getLogger("classify")

T = TypeVar("T")
LAST_IN_GROUP = 2**62  # a job's `order` that runs it after every key's admission (key ids are smaller)
TableLike = type[Base]  # a model class of db.py, as `insert()` takes it


class Transaction:
    """The group's open transaction, as a job sees it: statements in, the driver's rows out."""

    def __init__(self, connection: PoolProxiedConnection, dialect: Dialect,
                 compiled: dict[Hashable, tuple[str, tuple[str, ...] | None, dict[str, Any]]],
                 after_insert: "dict[TableLike, AfterInsert]") -> None:
        self.connection = connection
        self.cursor = connection.cursor()
        self.dialect = dialect
        self.is_postgres = dialect.name == "postgresql"
        self._compiled = compiled  # the writer's, kept across transactions
        self._after_insert = after_insert
        self._inserted: dict[TableLike, list[dict[str, Any]]] = {}  # what after_insert has still to count

    def execute(self, statement: Executable, **params: Any) -> Any:
        """Runs `statement` with its bind parameters; the driver's cursor, to fetch from."""
        sql, names, defaults = self._compiled.get(statement) or self._compile(statement, statement)
        bound = _bound(names, defaults, params)
        try:
            return self.cursor.execute(sql, bound)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self.translated(exc, sql, bound) from exc

    def run_sql(self, sql: str) -> None:
        """A statement of the driver's own SQL, without parameters (BEGIN, a PRAGMA)."""
        try:
            self.cursor.execute(sql)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self.translated(exc, sql) from exc

    def one(self, statement: Executable, **params: Any) -> tuple[Any, ...]:
        return self.execute(statement, **params).fetchone()

    def scalar(self, statement: Executable, **params: Any) -> Any:
        row = self.execute(statement, **params).fetchone()
        return None if row is None else row[0]

    def insert(self, table: TableLike, rows: list[dict[str, Any]]) -> None:
        """One INSERT of `rows`, which all have the same keys; what else they write (the writer's `after_insert`)
        follows at `finish`, so a group's rows and a job's are counted together, in one order."""
        self.execute_many(_insert_into(table), rows)
        self.count_as_inserted(table, rows)

    def count_as_inserted(self, table: TableLike, rows: list[dict[str, Any]]) -> None:
        """Rows already in `table` that its `after_insert` has not seen (the log rows from before the rollups:
        ledger/backfill.py): counted at `finish` with the group's new rows, in the same one order."""
        if table in self._after_insert and rows:
            self._inserted.setdefault(table, []).extend(rows)

    def finish(self) -> None:
        """What the inserted rows write besides themselves (a log row's rollups), all at once just before the
        commit: in one order on every host (rollups.py sorts them), and holding those rows' locks briefly."""
        for table, rows in self._inserted.items():
            self._after_insert[table](self, rows)
        self._inserted.clear()

    def execute_many(self, statement: Executable, rows: list[dict[str, Any]]) -> None:
        """`statement` once per row of `rows`, which all have the same keys (an INSERT, an upsert: rollups.py);
        compiled once per statement object and set of keys."""
        columns = tuple(rows[0])
        key = (statement, columns)
        sql, names, defaults = self._compiled.get(key) or self._compile(key, statement, columns)
        bound = [_bound(names, defaults, row) for row in rows]
        try:
            self.cursor.executemany(sql, bound)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self.translated(exc, sql, bound) from exc

    def translated(self, exc: Exception, sql: str, params: Any = ()) -> DBAPIError:
        """The driver's error as SQLAlchemy's, which operations/errors.py and the exception handlers know."""
        is_disconnect = self.dialect.is_disconnect(exc, self.connection.dbapi_connection, self.cursor)
        return DBAPIError.instance(sql, params, exc, self.dialect.loaded_dbapi.Error, dialect=self.dialect,
                                   connection_invalidated=is_disconnect)  # type: ignore[return-value]

    def _compile(self, key: Hashable, statement: Executable,
                 columns: tuple[str, ...] = ()) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        compiled = statement.compile(dialect=self.dialect, column_keys=list(columns) or None)
        # Literal values (a LIMIT 1) become parameters too: they are bound from here.
        defaults = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}
        positions = tuple(compiled.positiontup) if compiled.positiontup is not None else None
        found = self._compiled[key] = (compiled.string, positions, defaults)
        return found


def dialect_insert(dialect_name: str) -> Callable[[TableLike], Insert]:
    """The INSERT that can say ON CONFLICT, PostgreSQL's or SQLite's (they spell it alike): for upserts."""
    return postgresql.insert if dialect_name == "postgresql" else sqlite.insert


@functools.cache
def _insert_into(table: TableLike) -> Executable:
    """One INSERT statement object per table, so the compiled cache finds it again (a new one would miss)."""
    return insert(table)


def _bound(names: tuple[str, ...] | None, defaults: dict[str, Any], params: dict[str, Any]) -> Any:
    """Parameters as the driver takes them: a tuple in order for SQLite's `?`, a dict for psycopg's `%(name)s`."""
    if defaults:
        params = {**defaults, **params}
    return params if names is None else tuple(params[name] for name in names)


@dataclass(eq=False)
class _Item:
    future: asyncio.Future[Any]
    deadline: float | None  # its request's database deadline (time.monotonic()); None outside a request
    job: Callable[[Transaction], Any] | None = None
    order: int = 0
    table: TableLike | None = None
    row: dict[str, Any] | None = None


AfterInsert = Callable[[Transaction, list[dict[str, Any]]], None]


class DatabaseWriter:
    """The thread (named `database`) and its connection; start() it, and stop() it last.

    `after_insert` maps a table to what else its rows write, in the same transaction (the request log's
    rollups: rollups.add_rows)."""

    def __init__(self, database_url: str, timeout_s: float, after_insert: dict[TableLike, AfterInsert] | None = None
                 ) -> None:
        self.engine = make_writer_engine(database_url, timeout_s)
        self.timeout_s = timeout_s
        self._after_insert = after_insert or {}
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()  # None: stop
        self._thread = threading.Thread(target=self._serve, name="database", daemon=True)
        self._connection: PoolProxiedConnection | None = None  # opened by the thread when first needed
        self._compiled: dict[Hashable, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        self._busy_timeout_ms: int | None = None  # SQLite's, as set on the connection
        self._is_reconnect_due = False

    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    async def stop(self) -> None:
        """Writes what was handed over, then closes the connection."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self.engine.dispose()

    def reconnect(self) -> None:
        """The next group opens a new connection (database_file.py: the SQLite file was replaced)."""
        self._is_reconnect_due = True

    async def run(self, job: Callable[[Transaction], T], order: int = 0) -> T:
        """`job`'s result, from the next group's transaction; a caller cancelled before it ran, it does not run."""
        return await self._submit(_Item(asyncio.get_running_loop().create_future(), _deadline(), job=job, order=order))

    def run_soon(self, job: Callable[[Transaction], T], order: int = 0) -> "asyncio.Future[T]":
        """`run`, handed over now and awaited later (or not): a write handed over after it goes in the same group
        or a later one."""
        return self._submit(_Item(asyncio.get_running_loop().create_future(), _deadline(), job=job, order=order))

    async def insert(self, table: TableLike, row: dict[str, Any]) -> None:
        """Inserts `row` with the next group, and returns once it is committed."""
        future = self._submit(_Item(asyncio.get_running_loop().create_future(), _deadline(), table=table, row=row))
        await asyncio.shield(future)  # a caller that is cancelled does not take its row out of the group

    def _submit(self, item: _Item) -> asyncio.Future[Any]:
        if not self._thread.is_alive():
            raise RuntimeError("the database thread has stopped")
        self._queue.put(item)
        return item.future

    def _serve(self) -> None:
        is_stopping = False
        while not is_stopping:
            group = [self._queue.get()]
            while not self._queue.empty():
                group.append(self._queue.get())
            is_stopping = None in group
            # A cancelled future is read from this thread as a hint only: its caller has gone, so it need not run.
            items = [item for item in group if item is not None and not item.future.cancelled()]
            if items:
                try:
                    self._settle(items, self._write(items))
                except BaseException as exc:  # a bug here must not stop the thread and leave callers waiting
                    logger.exception("the database thread failed on a group of %d", len(items))
                    self._settle(items, [exc] * len(items))
        self._disconnect()

    def _write(self, items: list[_Item]) -> list[Any]:
        """Each item's outcome: its job's result, None for a row, or the exception that is its answer."""
        try:
            return self._commit(items)
        except Exception as exc:
            if len(items) == 1 or is_database_unavailable(exc):
                return [exc] * len(items)
        # One item the database refuses must not fail the requests that shared its transaction.
        outcomes = []
        for item in items:
            try:
                outcomes.extend(self._commit([item]))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _commit(self, items: list[_Item]) -> list[Any]:
        deadline = min((item.deadline for item in items if item.deadline is not None), default=None)
        transaction = Transaction(self._connect(), self.engine.dialect, self._compiled, self._after_insert)
        outcomes: dict[int, Any] = {}
        try:
            self._begin(transaction, lock_wait_ms(self.timeout_s, deadline))
            jobs = sorted((index for index, item in enumerate(items) if item.job is not None),
                          key=lambda index: items[index].order)
            for index in jobs:
                try:
                    outcomes[index] = items[index].job(transaction)  # type: ignore[misc]
                except DBAPIError:
                    raise
                except Exception as exc:
                    outcomes[index] = exc
            rows: dict[TableLike, list[int]] = {}
            for index, item in enumerate(items):
                if item.table is not None:
                    rows.setdefault(item.table, []).append(index)
            for table, indexes in rows.items():
                transaction.insert(table, [items[index].row for index in indexes])  # type: ignore[misc]
                outcomes.update(dict.fromkeys(indexes))
            transaction.finish()
            self._end(transaction, "COMMIT")
        except BaseException as exc:
            self._end_quietly(transaction, exc)
            raise
        return [outcomes[index] for index in range(len(items))]

    def _begin(self, transaction: Transaction, bound_ms: int) -> None:
        if transaction.is_postgres:  # psycopg sends BEGIN with the first statement
            if bound_ms < self.timeout_s * 1000 - WAIT_BOUND_SLACK_MS:  # a request that has waited already
                transaction.run_sql(f"SET LOCAL lock_timeout = {max(1, bound_ms)}")
            return
        # SQLite's busy timeout belongs to the connection: set anew only when off by more than the slack.
        if self._busy_timeout_ms is None or abs(self._busy_timeout_ms - bound_ms) > WAIT_BOUND_SLACK_MS:
            transaction.run_sql(f"PRAGMA busy_timeout = {bound_ms}")
            self._busy_timeout_ms = bound_ms
        transaction.run_sql("BEGIN IMMEDIATE")  # the write lock, once for the group

    @staticmethod
    def _end(transaction: Transaction, how: str) -> None:
        """COMMIT or ROLLBACK."""
        driver_connection = transaction.connection.driver_connection
        try:
            if transaction.is_postgres:
                driver_connection.commit() if how == "COMMIT" else driver_connection.rollback()  # type: ignore[union-attr]
            elif driver_connection.in_transaction:  # type: ignore[union-attr]
                transaction.run_sql(how)
        except transaction.dialect.loaded_dbapi.Error as exc:
            raise transaction.translated(exc, how) from exc

    def _end_quietly(self, transaction: Transaction, cause: BaseException) -> None:
        """Rolls back after `cause`; a connection that cannot even do that is replaced before the next group."""
        if isinstance(cause, DBAPIError) and cause.connection_invalidated:
            self._disconnect(is_broken=True)
            return
        try:
            self._end(transaction, "ROLLBACK")
        except Exception as exc:
            logger.warning("replacing the database thread's connection after a failed rollback: %s", exc)
            self._disconnect(is_broken=True)

    def _connect(self) -> PoolProxiedConnection:
        if self._is_reconnect_due:
            self._is_reconnect_due = False
            self._disconnect()
        if self._connection is None:
            try:
                self._connection = self.engine.raw_connection()
            except self.engine.dialect.loaded_dbapi.Error as exc:  # SQLAlchemy's error, a 503 if transient
                raise DBAPIError.instance(None, None, exc, self.engine.dialect.loaded_dbapi.Error,
                                          dialect=self.engine.dialect) from exc
            self._busy_timeout_ms = None
        return self._connection

    def _disconnect(self, is_broken: bool = False) -> None:
        """Closes the connection; a broken one is dropped without the rollback a close would try first."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.invalidate() if is_broken else connection.close()
            except Exception as exc:  # a connection already lost
                logger.debug("closing the database thread's connection: %s", exc)

    @staticmethod
    def _settle(items: list[_Item], outcomes: list[Any]) -> None:
        """Hands the outcomes to the callers' event loops: one wake-up per group, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for item, outcome in zip(items, outcomes):
            by_loop.setdefault(item.future.get_loop(), []).append((item.future, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_outcomes, settled)
            except RuntimeError:  # the loop has closed: no one is waiting any more
                pass


def _set_outcomes(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in settled:
        if future.done():  # cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):  # jobs return values, never exceptions: this is a failure
            future.set_exception(outcome if isinstance(outcome, Exception) else RuntimeError("the write was cancelled"))
            future.exception()  # marked as seen: a caller cancelled meanwhile never reads it, asyncio would log it
        else:
            future.set_result(outcome)


def _deadline() -> float | None:
    budget = wait_budget.get()
    return budget.deadline if budget is not None else None
