"""Alembic's entry point: runs the migrations on the connection db.migrate hands over (the server, the CLI),
or, from the `alembic` command, on DATABASE_URL."""

import asyncio

from alembic import context
from sqlalchemy import Connection

from db import Base, make_engine
from settings import Settings


def run_migrations(connection: Connection) -> None:
    # render_as_batch: SQLite alters a table by copying it, and Alembic writes later migrations that way.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_on_database_url() -> None:
    settings = Settings()
    engine = make_engine(settings.database_url, settings.db_timeout_s)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) migrations are not supported: run them against the database.")
given = context.config.attributes.get("connection")
if given is not None:
    run_migrations(given)
else:
    asyncio.run(run_on_database_url())
