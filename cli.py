"""Key administration, against the same DATABASE_URL as the server (safe while it runs).

    $ python cli.py migrate                                # bring the database's schema to the latest revision
    $ python cli.py init                                   # migrate; the first key, if there is none
    $ python cli.py create-key --email ada@example.com --rate-limit 100 --window 60 [--json]
    $ python cli.py list-keys [--json]                     # prefix, email, limit, window, created, last used, revoked
    $ python cli.py set-limit sk-Qm3xTz8b [--rate-limit 500] [--window 60]
    $ python cli.py rotate-key sk-Qm3xTz8b [--json]        # a new key, same owner and limit; the old one revoked
    $ python cli.py revoke-key sk-Qm3xTz8b                 # the whole key, or a prefix of it
    $ python cli.py prune                                  # delete what has passed its retention (for cron)

Commands that take a key take the whole key or a prefix of it as list-keys shows it (`sk-` and up to 8 more
characters). A new key is printed once, alone on the last line of stdout (with --json: stdout is one JSON object,
the key in `key`); messages about failures go to stderr. Running servers see a changed limit or a revoked key
within KEY_CACHE_TTL_S (they keep a key they have read that long); a new key works at once.

Exit codes, for scripts:
    0  done
    1  no key matches, the prefix matches several keys, or rotate-key was given a revoked key
    2  bad arguments (argparse's own code), or a setting that is not valid (one line names it)
    3  the database is busy or unreachable, or its SQLite file does not exist (only init and migrate create one);
       one line names DATABASE_URL (its password hidden) and what to do
    4  the database's tables were not made by this server, so they are not migrated
    5  anything unexpected (a bug, a permission the database refuses): the traceback is printed
"""

import argparse
import asyncio
import json
import sys
import traceback
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from db import ApiKey, ForeignSchemaError, RequestLog, make_engine, make_sessionmaker, migrate, now_ms
from ledger.backfill import ANY_KEY_LEFT
from ledger.database_file import DatabaseFile
from ledger.keys import KEY_PATTERN, PREFIX_LENGTH, create_key, find_keys
from ledger.retention import prune
from ledger.writer import DatabaseWriter
from operations.configuration_errors import (ConfigurationError, UnusableDatabase, check_sqlite_file, load_settings,
                                             unusable_database)
from settings import Settings

EXIT_WRONG_KEY = 1
EXIT_BAD_SETTING = 2  # as argparse's bad arguments: the command as given cannot run
EXIT_DATABASE_UNAVAILABLE = 3
EXIT_FOREIGN_SCHEMA = 4
EXIT_UNEXPECTED = 5


class WrongKey(Exception):
    """The key given matches no key, several keys, or one that cannot be used for this command: exit 1."""


class DatabaseMissing(Exception):
    """No SQLite file at DATABASE_URL's path, for a command that must not create one: exit 3."""


# Only these may create a SQLite file. Any other command finding none would create and migrate an empty one,
# which a running server then switches to (its keys gone), and which is lost when the real file is put back.
CREATING_COMMANDS = {"init", "migrate"}


def iso_time(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def table_time(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


MIN_PREFIX_LENGTH = len("sk-") + 4  # an empty or bare "sk-" argument (an unset variable) must not match every key


async def find_one_key(session: AsyncSession, key_or_prefix: str) -> ApiKey:
    if len(key_or_prefix) < MIN_PREFIX_LENGTH:
        raise WrongKey(f"{key_or_prefix!r} is too short to name a key: give the whole key or a prefix of at least "
                       f"{MIN_PREFIX_LENGTH} characters, as list-keys shows them.")
    if len(key_or_prefix) > PREFIX_LENGTH and not KEY_PATTERN.fullmatch(key_or_prefix):
        raise WrongKey(f"{key_or_prefix!r} is neither a whole key nor a prefix: a prefix has at most {PREFIX_LENGTH} "
                       "characters, as list-keys shows them.")
    matches = await find_keys(session, key_or_prefix)
    if len(matches) != 1:
        problem = "No key matches" if not matches else f"{len(matches)} keys match"
        raise WrongKey(f"{problem} {key_or_prefix!r}; give the whole key or a longer prefix (python cli.py list-keys).")
    return matches[0]


async def cmd_migrate(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    print("Database schema is at the latest revision.")  # `run` migrated it, as before every command
    return 0


async def cmd_init(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    if await session.scalar(select(func.count()).select_from(ApiKey)):
        print("Database ready; it already has API keys (python cli.py list-keys).")
        return 0
    print("Database ready; creating the first API key.")
    await create_and_show_key(session, "admin@localhost", settings.default_rate_limit, settings.default_window_s)
    return 0


async def cmd_create_key(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    rate_limit = args.rate_limit or settings.default_rate_limit
    window_s = args.window or settings.default_window_s
    await create_and_show_key(session, args.email, rate_limit, window_s, args.json)
    return 0


async def create_and_show_key(session: AsyncSession, email: str, rate_limit: int, window_s: int,
                              as_json: bool = False) -> None:
    key, api_key = await create_key(session, email, rate_limit, window_s)
    await session.commit()  # before the key is shown: a key printed must be a key that works
    if as_json:
        print(json.dumps({"key": key, **key_fields(api_key)}))
        return
    print(f"Created key {api_key.prefix}... for {email}: {rate_limit} requests per {window_s} s.")
    show_once(key)


def show_once(key: str) -> None:
    print("It is shown only this once; keep it:")
    print(key)


def key_fields(api_key: ApiKey) -> dict[str, object]:
    """A key's fields as list-keys --json shows them (it adds when the key was last used, and revoked)."""
    return {"prefix": api_key.prefix, "email": api_key.email, "rate_limit": api_key.rate_limit,
            "window_s": api_key.window_s, "created": iso_time(api_key.created_at_ms)}


async def cmd_list_keys(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    # The latest request-log row per key, in the same query: the (key_id, created_at_ms) index answers each MAX.
    last_used = select(func.max(RequestLog.created_at_ms)).where(RequestLog.key_id == ApiKey.id).scalar_subquery()
    keys = (await session.execute(select(ApiKey, last_used).order_by(ApiKey.id))).all()
    rows = [{**key_fields(k), "last_used": iso_time(used_ms), "revoked": iso_time(k.revoked_at_ms)}
            for k, used_ms in keys]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    email_width = max([len("EMAIL"), *(len(k.email) for k, _ in keys)])
    print(f"{'PREFIX':<12} {'EMAIL':<{email_width}} {'LIMIT':>7} {'WINDOW':>7}  {'CREATED (UTC)':<16}  {'LAST USED':<16}  REVOKED")
    for k, used_ms in keys:
        print(f"{k.prefix:<12} {k.email:<{email_width}} {k.rate_limit:>7} {str(k.window_s) + 's':>7}  "
              f"{table_time(k.created_at_ms):<16}  {table_time(used_ms):<16}  {table_time(k.revoked_at_ms)}")
    return 0


async def cmd_set_limit(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    api_key = await find_one_key(session, args.key)
    before = f"{api_key.rate_limit} per {api_key.window_s} s"
    api_key.rate_limit = args.rate_limit or api_key.rate_limit
    api_key.window_s = args.window or api_key.window_s
    await session.commit()
    revoked = " It is revoked, so this matters only if it is ever revived." if api_key.revoked_at_ms else ""
    print(f"{api_key.prefix}... ({api_key.email}) may now make {api_key.rate_limit} requests per {api_key.window_s} s "
          f"(was {before}); running servers apply it within KEY_CACHE_TTL_S ({settings.key_cache_ttl_s:g} s).{revoked}")
    return 0


async def cmd_rotate_key(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    old = await find_one_key(session, args.key)
    if old.revoked_at_ms is not None:
        raise WrongKey(f"{old.prefix}... was revoked at {iso_time(old.revoked_at_ms)}; "
                       "make a new key with create-key instead.")
    key, new = await create_key(session, old.email, old.rate_limit, old.window_s)
    old.revoked_at_ms = now_ms()
    await session.commit()  # both at once: the old key stops working exactly when the new one exists
    if args.json:
        print(json.dumps({"key": key, **key_fields(new), "replaces": old.prefix}))
        return 0
    print(f"Revoked {old.prefix}... ({old.email}): running servers refuse it within KEY_CACHE_TTL_S "
          f"({settings.key_cache_ttl_s:g} s). Its replacement {new.prefix}... works at once, has the same owner and "
          f"limit ({new.rate_limit} requests per {new.window_s} s) and starts with an empty window.")
    show_once(key)
    return 0


async def cmd_revoke_key(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    api_key = await find_one_key(session, args.key)
    if api_key.revoked_at_ms is None:
        api_key.revoked_at_ms = now_ms()
        await session.commit()
    print(f"Revoked {api_key.prefix}... ({api_key.email}) at {iso_time(api_key.revoked_at_ms)}; running servers "
          f"refuse it within KEY_CACHE_TTL_S ({settings.key_cache_ttl_s:g} s).")
    return 0


async def prune_now(settings: Settings) -> int:
    """Deletes, in small batches, log rows and rollups past REQUEST_LOG_RETENTION_DAYS and USAGE_RETENTION_DAYS."""
    writer = DatabaseWriter(settings.database_url, settings.db_timeout_s)
    writer.start()
    try:
        log_rows, rollups = await prune(writer, settings)
        is_backfill_left = await writer.run(lambda transaction: transaction.scalar(ANY_KEY_LEFT) is not None)
    finally:
        await writer.stop()
    print(f"Deleted {log_rows} request-log rows older than {settings.request_log_retention_days} days "
          f"(REQUEST_LOG_RETENTION_DAYS) and {rollups} usage rollups older than {settings.usage_retention_days} days "
          "(USAGE_RETENTION_DAYS).")
    if is_backfill_left:
        print("Log rows are kept while the server counts the log from before the usage rollups into them; "
              "prune again once it has (its log says when).")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python cli.py", description="Manage the API's keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="bring the database's schema to the latest revision").set_defaults(run=cmd_migrate)
    commands.add_parser("init", help="create the tables, and a first key if there is none").set_defaults(run=cmd_init)
    create = commands.add_parser("create-key", help="create a key and print it once")
    create.add_argument("--email", required=True, help="whom the key belongs to")
    create.add_argument("--rate-limit", type=positive_int, help="requests per window (default: DEFAULT_RATE_LIMIT)")
    create.add_argument("--window", type=positive_int, help="window in seconds (default: DEFAULT_WINDOW_S)")
    create.add_argument("--json", action="store_true", help="print one JSON object (the key in `key`), nothing else")
    create.set_defaults(run=cmd_create_key)
    listing = commands.add_parser("list-keys", help="show every key's prefix, owner, limit and state")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    listing.set_defaults(run=cmd_list_keys)
    set_limit = commands.add_parser("set-limit", help="change a key's rate limit, window or both; servers apply it within KEY_CACHE_TTL_S")
    set_limit.add_argument("key", help="the whole key, or a prefix such as sk-Qm3xTz8b")
    set_limit.add_argument("--rate-limit", type=positive_int, help="requests per window (default: unchanged)")
    set_limit.add_argument("--window", type=positive_int, help="window in seconds (default: unchanged)")
    set_limit.set_defaults(run=cmd_set_limit)
    rotate = commands.add_parser("rotate-key", help="replace a key: a new one printed once, the old one revoked")
    rotate.add_argument("key", help="the whole key, or a prefix such as sk-Qm3xTz8b")
    rotate.add_argument("--json", action="store_true", help="print one JSON object (the new key in `key`), nothing else")
    rotate.set_defaults(run=cmd_rotate_key)
    revoke = commands.add_parser("revoke-key", help="stop a key working; servers refuse it within KEY_CACHE_TTL_S")
    revoke.add_argument("key", help="the whole key, or a prefix such as sk-Qm3xTz8b")
    revoke.set_defaults(run=cmd_revoke_key)
    commands.add_parser("prune", help="delete request-log rows and usage rollups past their retention, in small "
                                      "batches; servers do it every 10 minutes")
    args = parser.parse_args(argv)
    if args.command == "set-limit" and args.rate_limit is None and args.window is None:
        set_limit.error("give --rate-limit, --window, or both")
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def run(args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings.database_url, settings.db_timeout_s, pool_size=1, max_overflow=1)
    try:
        database_file = DatabaseFile(engine).path
        if database_file is not None and not database_file.exists() and args.command not in CREATING_COMMANDS:
            raise DatabaseMissing(f"There is no database file at {database_file} (DATABASE_URL); {args.command} "
                                  "creates none. If it was moved away, put it back with its -wal and -shm files; "
                                  "for a new database, run `python cli.py init`.")
        check_sqlite_file(settings.database_url)
        await migrate(engine)
        if args.command == "prune":  # batch by batch, each its own transaction: no session holding the lock
            return await prune_now(settings)
        async with make_sessionmaker(engine)() as session:
            # SQLite: the write lock first: a running server commits between our read and our write otherwise, and
            # SQLite refuses to upgrade a read transaction that has gone stale (PostgreSQL ignores the option).
            # Each command commits, then prints.
            await session.connection(execution_options={"sqlite_immediate": True})
            return await args.run(session, args, settings)
    except OperationalError as exc:
        raise unusable_database(settings.database_url, exc) from None
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args, load_settings()))
    except WrongKey as exc:
        print(exc, file=sys.stderr)
        return EXIT_WRONG_KEY
    except (DatabaseMissing, UnusableDatabase) as exc:
        print(exc, file=sys.stderr)
        return EXIT_DATABASE_UNAVAILABLE
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_SETTING
    except ForeignSchemaError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FOREIGN_SCHEMA
    except Exception:  # anything else must not look like exit 1 ("no such key") to a script
        traceback.print_exc()
        print("Unexpected error (the traceback is above); nothing was changed unless the output says so.",
              file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
