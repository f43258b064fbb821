"""Is the SQLite file the server writes still the file at DATABASE_URL's path?

SQLite keeps a deleted (or moved-away) database open and goes on writing into it: every answer would be
logged into a file nobody can read again, and the books would silently lose them. So /v1 requests and
/readyz look first (a few stat() calls, microseconds): while no file is at the path, they answer 503
`database_unavailable` / `not_ready` with Retry-After and write nothing. When a file is back at the path
(moved back, or restored from a backup), the engine's pooled connections to the old one are closed and
the next requests open the new one: the server recovers by itself, with no restart.

A new file at the path does not come with the old one's `-wal` and `-shm`, but they are still there when only
the database file was removed, and SQLite would apply that write-ahead log to whatever file it finds at the
path: a restored backup would come back with the old file's last writes on top. So when the file at the path
is a different one, the `-wal` and `-shm` that belonged to the old file are moved aside (`-wal.stale-<time>`),
with a warning, before anything opens the new one; a `-wal` made for the new file is left alone.
"""

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("classify")

Identity = tuple[int, int] | None  # (device, inode); None: no file
COMPANIONS = ("-wal", "-shm")  # SQLite's write-ahead log and its index, named after the database file


def _identity(path: Path) -> Identity:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


class DatabaseFile:
    def __init__(self, engine: AsyncEngine, on_replaced: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_replaced = on_replaced  # for connections of other engines (the database and reading threads')
        database = engine.url.database
        # None: PostgreSQL (Settings refuses an in-memory SQLite database)
        self.path = Path(database).resolve() if engine.url.get_backend_name() == "sqlite" and database else None
        self.identity: Identity = None
        self.companions: dict[str, Identity] = {}  # the -wal and -shm files of the file at `identity`
        if self.path is not None:
            self.identity = _identity(self.path)
            self._note_companions()

    def _companion(self, suffix: str) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + suffix)

    def _note_companions(self) -> None:
        # SQLite deletes and recreates its -wal at times, so they are looked at again on every check.
        self.companions = {suffix: _identity(self._companion(suffix)) for suffix in COMPANIONS}

    async def is_usable(self) -> bool:
        """False while no file is at the path; a new file there replaces the old one's connections."""
        if self.path is None:
            return True
        identity = _identity(self.path)
        if identity is None:
            return False
        if identity == self.identity:
            self._note_companions()
            return True
        # Before any await: a request that comes meanwhile sees the new file, and nothing stale beside it.
        moved = self._move_aside_stale_companions()
        self.identity = identity
        self._note_companions()
        logger.warning("database file %s was replaced: reconnecting%s", self.path,
                       f"; the old file's {' and '.join(moved)} moved aside, or SQLite would have applied them "
                       "to the new one" if moved else "")
        if self.on_replaced is not None:
            self.on_replaced()
        await self.engine.dispose()  # closes the connections to the old file (ones in use close when returned)
        return True

    def _move_aside_stale_companions(self) -> list[str]:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for suffix, old_identity in self.companions.items():
            companion = self._companion(suffix)
            if old_identity is not None and _identity(companion) == old_identity:
                aside = companion.with_name(f"{companion.name}.stale-{stamp}")
                companion.rename(aside)
                moved.append(f"{companion.name} (now {aside.name})")
        return moved
