"""Key administration, against the same DATABASE_URL as the server (safe while it runs).

    $ python cli.py migrate                                # bring the database's schema to the latest revision
    $ python cli.py init                                   # migrate; the first key, if there is none
    $ python cli.py create-key --email ada@example.com --rate-limit 100 --window 60
    $ python cli.py list-keys [--json]
    $ python cli.py revoke-key sk-Qm3xTz8b                 # the whole key, or a prefix of it

A new key is printed once, alone on the last line of stdout. Exit codes: 0 done, 1 no such key or an
ambiguous prefix, 2 bad arguments, 3 the database is busy or unreachable, 4 its tables were not made by this
server (so they are not migrated).
"""

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from auth import KEY_PATTERN, PREFIX_LENGTH, create_key, find_keys
from db import ApiKey, ForeignSchemaError, make_engine, make_sessionmaker, migrate, now_ms
from settings import Settings


def iso_time(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


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
    await create_and_show_key(session, args.email, rate_limit, window_s)
    return 0


async def create_and_show_key(session: AsyncSession, email: str, rate_limit: int, window_s: int) -> None:
    key, api_key = await create_key(session, email, rate_limit, window_s)
    await session.commit()  # before the key is shown: a key printed must be a key that works
    print(f"Created key {api_key.prefix}... for {email}: {rate_limit} requests per {window_s} s.")
    print("It is shown only this once; keep it:")
    print(key)


async def cmd_list_keys(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    keys = (await session.scalars(select(ApiKey).order_by(ApiKey.id))).all()
    rows = [{"prefix": k.prefix, "email": k.email, "rate_limit": k.rate_limit, "window_s": k.window_s,
             "created": iso_time(k.created_at_ms), "revoked": iso_time(k.revoked_at_ms)} for k in keys]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'PREFIX':<13} {'EMAIL':<30} {'LIMIT':>12}  {'CREATED':<25} REVOKED")
    for row in rows:
        limit = f"{row['rate_limit']}/{row['window_s']}s"
        print(f"{row['prefix']:<13} {row['email']:<30} {limit:>12}  {row['created']:<25} {row['revoked'] or '-'}")
    return 0


async def cmd_revoke_key(session: AsyncSession, args: argparse.Namespace, settings: Settings) -> int:
    if len(args.key) > PREFIX_LENGTH and not KEY_PATTERN.fullmatch(args.key):
        print(f"{args.key!r} is neither a whole key nor a prefix: a prefix has at most {PREFIX_LENGTH} characters, "
              "as list-keys shows them.", file=sys.stderr)
        return 1
    matches = await find_keys(session, args.key)
    if len(matches) != 1:
        problem = "No key matches" if not matches else f"{len(matches)} keys match"
        print(f"{problem} {args.key!r}; give the whole key or a longer prefix (python cli.py list-keys).",
              file=sys.stderr)
        return 1
    api_key = matches[0]
    if api_key.revoked_at_ms is None:
        api_key.revoked_at_ms = now_ms()
        await session.commit()
    print(f"Revoked {api_key.prefix}... ({api_key.email}) at {iso_time(api_key.revoked_at_ms)}.")
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
    create.set_defaults(run=cmd_create_key)
    listing = commands.add_parser("list-keys", help="show every key's prefix, owner, limit and state")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    listing.set_defaults(run=cmd_list_keys)
    revoke = commands.add_parser("revoke-key", help="stop a key working at once")
    revoke.add_argument("key", help="the whole key, or a prefix such as sk-Qm3xTz8b")
    revoke.set_defaults(run=cmd_revoke_key)
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def run(args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings.database_url, settings.db_timeout_s, pool_size=1, max_overflow=1)
    try:
        await migrate(engine)
        async with make_sessionmaker(engine)() as session:
            # SQLite: the write lock first: a running server commits between our read and our write otherwise, and
            # SQLite refuses to upgrade a read transaction that has gone stale (PostgreSQL ignores the option).
            # Each command commits, then prints.
            await session.connection(execution_options={"sqlite_immediate": True})
            return await args.run(session, args, settings)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args, Settings()))
    except OperationalError as exc:
        print(f"The database is busy or unreachable ({exc.orig}); try again.", file=sys.stderr)
        return 3
    except ForeignSchemaError as exc:
        print(exc, file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
