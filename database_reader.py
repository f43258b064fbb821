"""The threads that read for /v1/usage (named `database_read_N`), each on a synchronous connection of its own.

A read is a function of a connection, run in one transaction in one of these threads: one hand-off from the
event loop and one future back. Through the async engine each statement on SQLite took four hand-offs to
aiosqlite's thread and back (cursor, execute, fetch, close), and each waited for a core under load: most of
/v1/usage's time while the model ran. The request's database wait budget (db.waiting_until) goes with the read.
"""

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Connection

from db import make_reader_engine
from os_threads import name_os_thread

T = TypeVar("T")

READING_THREADS = 2  # reads are short; two let a long one (thousands of buckets) not hold up the next


class DatabaseReader:
    def __init__(self, database_url: str, timeout_s: float, threads: int = READING_THREADS) -> None:
        self.engine = make_reader_engine(database_url, timeout_s, threads)
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="database_read",
                                           initializer=name_os_thread)

    async def run(self, read: Callable[[Connection], T]) -> T:
        """`read`'s result, from one transaction in a reading thread."""
        context = contextvars.copy_context()  # the request's wait budget, and its id for log lines
        return await asyncio.get_running_loop().run_in_executor(self._threads, context.run, self._in_transaction,
                                                                read)

    def _in_transaction(self, read: Callable[[Connection], T]) -> T:
        with self.engine.begin() as connection:
            return read(connection)

    def reconnect(self) -> None:
        """Reads from now on open new connections (database_file.py: the SQLite file was replaced)."""
        self.engine.dispose()

    def stop(self) -> None:
        self._threads.shutdown(wait=True)
        self.engine.dispose()
