"""Is the SQLite file the server writes still the file at DATABASE_URL's path?

SQLite keeps a deleted (or moved-away) database open and goes on writing into it: every answer would be
logged into a file nobody can read again, and the books would silently lose them. So /v1 requests and
/readyz look first (one stat(), a few microseconds): while no file is at the path, they answer 503
`database_unavailable` / `not_ready` with Retry-After and write nothing. When a file is back at the path
(moved back, or restored from a backup), the engine's pooled connections to the old one are closed and
the next requests open the new one: the server recovers by itself, with no restart.
"""

import logging
import os
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("classify")


class DatabaseFile:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        database = engine.url.database
        is_file = engine.url.get_backend_name() == "sqlite" and database not in (None, "", ":memory:")
        self.path = Path(database).resolve() if is_file and database else None  # None: not a file database
        self.identity = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    async def is_usable(self) -> bool:
        """False while no file is at the path; a new file there replaces the old one's connections."""
        if self.path is None:
            return True
        identity = self._identity()
        if identity is None:
            return False
        if identity != self.identity:
            logger.warning("database file %s was replaced: reconnecting", self.path)
            self.identity = identity
            await self.engine.dispose()
        return True
