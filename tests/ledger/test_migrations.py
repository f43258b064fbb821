"""Alembic owns the schema: migrations build exactly the models, on SQLite and PostgreSQL; databases made
before Alembic upgrade in place; servers starting together migrate one after another."""

import asyncio
import sqlite3

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from conftest import query, run_cli, sync_engine
from db import Base, alembic_config, make_engine, migrate


def differences_from_models(database_url: str) -> list:
    """What `alembic check` reports: how the database's schema differs from the models in db.py."""
    engine = sync_engine(database_url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrations_on_an_empty_database_build_exactly_the_models(database_url):
    done = run_cli(database_url, "migrate")
    assert done.returncode == 0, done.stderr
    assert differences_from_models(database_url) == []
    assert query(database_url, "SELECT version_num FROM alembic_version") == [{"version_num": head_revision()}]
    assert run_cli(database_url, "migrate").returncode == 0  # at head already: nothing to do


def test_servers_starting_together_migrate_one_after_another(database_url):
    async def migrate_at_once(count: int) -> None:
        engines = [make_engine(database_url, timeout_s=30) for _ in range(count)]
        try:
            await asyncio.gather(*[migrate(engine) for engine in engines])
        finally:
            for engine in engines:
                await engine.dispose()

    asyncio.run(migrate_at_once(4))
    assert differences_from_models(database_url) == []


def test_a_database_made_before_alembic_is_upgraded_in_place(tmp_path):
    """The core server made its tables with metadata.create_all and kept no version: such a database, rows
    and all, is stamped at the initial revision and brought to head."""
    path = tmp_path / "old.db"
    database_url = f"sqlite:///{path}"
    engine = sync_engine(database_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    with sqlite3.connect(path) as connection:
        connection.execute("ALTER TABLE request_log DROP COLUMN request_id")  # added by 0002, after the core server
        connection.execute("DROP TABLE readiness_check")  # added by 0003
        connection.execute("ALTER TABLE request_log DROP COLUMN model_version")  # added by 0004
        connection.execute("ALTER TABLE request_log DROP COLUMN replayed")  # added by 0005
        connection.execute("DROP TABLE idempotency_keys")  # added by 0005
        connection.execute("ALTER TABLE request_log DROP COLUMN images")  # added by 0006, with usage_rollups
        connection.execute("DROP TABLE usage_rollups")
        connection.execute("DROP TABLE rollup_backfill")
        connection.execute("DROP TABLE rate_limit_counts")  # added by 0007
        connection.execute("INSERT INTO api_keys VALUES (1, 'x', 'sk-old', 'old@example.com', 5, 60, 0, NULL)")
    connection.close()
    done = run_cli(database_url, "migrate")
    assert done.returncode == 0, done.stderr
    assert query(database_url, "SELECT version_num FROM alembic_version") == [{"version_num": head_revision()}]
    assert [row["email"] for row in query(database_url, "SELECT email FROM api_keys")] == ["old@example.com"]
    assert differences_from_models(database_url) == []


def test_a_database_with_other_tables_of_these_names_is_refused(tmp_path):
    path = tmp_path / "foreign.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE api_keys (id INTEGER PRIMARY KEY, secret TEXT)")
    connection.close()
    done = run_cli(f"sqlite:///{path}", "migrate")
    assert done.returncode == 4
    assert "api_keys" in done.stderr and "use another DATABASE_URL" in done.stderr
