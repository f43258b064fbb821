"""The reading threads (ledger/reader.py): a read waits for a free thread no longer than its request's database
budget (then a 503, as any other wait for the database), and a read so refused is not begun later."""

import asyncio
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from db import waiting_until
from ledger.reader import DatabaseReader

BUDGET_S = 0.3


def test_a_read_that_waits_its_whole_budget_for_a_thread_is_refused_and_never_begun(tmp_path: Path) -> None:
    reader = DatabaseReader(f"sqlite:///{tmp_path / 'reads.db'}", timeout_s=5, threads=1)
    release = threading.Event()
    begun: list[str] = []

    def long_read(connection: Connection) -> int:
        begun.append("long")
        release.wait(30)  # the one thread stays busy until the test lets it go
        return connection.execute(text("SELECT 1")).scalar_one()

    def short_read(connection: Connection) -> int:
        begun.append("short")
        return connection.execute(text("SELECT 2")).scalar_one()

    async def read_while_the_thread_is_busy() -> float:
        holding = asyncio.ensure_future(reader.run(long_read))
        while not begun:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        with waiting_until(time.monotonic() + BUDGET_S), pytest.raises(PoolTimeoutError):
            await reader.run(short_read)
        waited_s = time.monotonic() - started
        release.set()
        assert await holding == 1
        assert await reader.run(short_read) == 2  # the next read, with no deadline, is served
        return waited_s

    try:
        waited_s = asyncio.run(read_while_the_thread_is_busy())
    finally:
        release.set()
        reader.stop()
    assert waited_s < 5  # refused at its deadline, not once the long read had let the thread go
    assert begun == ["long", "short"]  # the refused read never ran: only the one after it
