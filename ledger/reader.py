"""The threads that read for /v1/usage (named `database_read_N`), on a pool of synchronous connections, one a thread.

A read is a function of a connection, run in one transaction in one of these threads: one hand-off from the
event loop and one future back. Through the async engine each statement on SQLite took four hand-offs to
aiosqlite's thread and back (cursor, execute, fetch, close), and each waited for a core under load: most of
/v1/usage's time while the model ran. The request's database wait budget (db.waiting_until) goes with the read:
it bounds the read's lock waits, and the whole read: past it the request is answered 503, and a read still
waiting for a thread is not begun.
"""

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from db import make_reader_engine, wait_budget
from operations.threads import name_os_thread

T = TypeVar("T")

READING_THREADS = 2  # reads are short; two let a long one (thousands of buckets) not hold up the next


class DatabaseReader:
    """The reading threads and their engine; `run` a read, `reconnect` when the SQLite file is replaced, and
    `stop` after the last request."""

    def __init__(self, database_url: str, timeout_s: float, threads: int = READING_THREADS) -> None:
        self.engine = make_reader_engine(database_url, timeout_s, threads)
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="database_read",
                                           initializer=name_os_thread)
        self._generation = 0  # one more at each reconnect

    async def run(self, read: Callable[[Connection], T]) -> T:
        """`read`'s result, from one transaction in a reading thread; PoolTimeoutError (a 503) once the request's
        database wait budget is used up, waiting for a thread or for the database."""
        context = contextvars.copy_context()  # the request's wait budget, and its id for log lines
        reading = asyncio.get_running_loop().run_in_executor(self._threads, context.run, self._in_transaction, read)
        budget = wait_budget.get()
        if budget is None:
            return await reading
        try:
            async with asyncio.timeout(budget.remaining_s()):
                return await reading  # cancelled, a read still waiting for a thread is never begun
        except TimeoutError:
            raise out_of_time() from None

    def _in_transaction(self, read: Callable[[Connection], T]) -> T:
        generation = self._generation
        with self.engine.connect() as connection:
            try:
                with connection.begin():
                    return read(connection)
            finally:
                if self._generation != generation:
                    # Opened on the file that was replaced meanwhile: closed now, not kept by the old pool
                    # until the garbage collector finds it.
                    connection.invalidate()

    def reconnect(self) -> None:
        """Reads from now on open new connections (database_file.py: the SQLite file was replaced)."""
        self._generation += 1
        self.engine.dispose()

    def stop(self) -> None:
        """Waits for reads in progress, then closes the connections."""
        self._threads.shutdown(wait=True)
        self.engine.dispose()


def out_of_time() -> PoolTimeoutError:
    return PoolTimeoutError("the request's database wait (DB_TIMEOUT_S) ran out: the reading threads were busy, "
                            "or the database did not answer")
