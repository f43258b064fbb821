"""A setting the server or the CLI cannot run with, said in one line: the setting, its value (passwords hidden)
and what to do. Never a traceback: it says where the code noticed, not what to change.

    load_settings       the environment and .env -> Settings; pydantic's errors -> ConfigurationError
    check_sqlite_file   a SQLite DATABASE_URL whose file cannot be opened -> UnusableDatabase, before connecting
    unusable_database   a DATABASE_URL that cannot be opened, or holds tables not ours -> UnusableDatabase
    settings_or_exit    the server, as main.py is imported: the line on stderr, then exit 3
    StartupFailure      the server's lifespan (migrating, loading the model): the line in the log, then start-up
                        fails by the ASGI lifespan protocol, so uvicorn exits 3 without a traceback

Exit status 3 is uvicorn's own for a failed start-up: under `--workers N` its supervisor then stops instead of
starting a worker that would fail the same way. cli.py prints the same lines and exits with its own codes.
"""

import logging
import os
import re
import sys
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings import Settings

logger = logging.getLogger("classify")

STARTUP_FAILURE = 3  # uvicorn's exit status when the app cannot start
PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")  # scheme://user:password@host


class ConfigurationError(Exception):
    """A setting the process cannot run with; the message, one line, names it, its value and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the parts held


class UnusableDatabase(ConfigurationError):
    """DATABASE_URL names a database that cannot be opened or used now (the CLI's exit 3)."""


def hide_passwords(text: str) -> str:
    """Every URL's password as ***, as SQLAlchemy shows DATABASE_URL: `postgresql://app:***@db/classify`."""
    return PASSWORD.sub(r"\1***@", text)


def load_settings() -> Settings:
    """Settings from the environment (and .env); ConfigurationError for every setting that is not valid."""
    try:
        return Settings()
    except ValidationError as exc:
        # A default computed from another setting is not made when that one is not valid: only that one is named.
        errors = [error for error in exc.errors(include_url=False) if error["type"] != "default_factory_not_called"]
        raise ConfigurationError("; ".join(map(describe, errors))) from None


def describe(error: dict) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a rule between settings: its message names them, with their values
        return message
    name = str(error["loc"][0]).upper()
    setting = f"{name}={hide_passwords(str(error.get('input')))}"
    if error["type"] == "value_error":  # our validators say what the setting must be
        return f"{setting} is not valid: {message}"
    return (f"{setting} is not valid ({message[:1].lower()}{message[1:]}): set {name} to what "
            "docs/settings.md says it takes, or unset it for the default")


def unusable_database(database_url: str, exc: Exception) -> UnusableDatabase:
    """Why DATABASE_URL cannot be used, from what opening or migrating it raised, and what to do."""
    setting = f"DATABASE_URL={hide_passwords(database_url)}"
    if not isinstance(exc, OperationalError):  # ForeignSchemaError: its message says what to do
        return UnusableDatabase(f"{setting}: {exc}")
    reason = (str(exc.orig).splitlines() or ["no reason given"])[0]
    url = make_url(database_url)  # Settings checked its shape
    if url.get_backend_name() == "sqlite":
        if problem := sqlite_file_problem(url.database):
            return UnusableDatabase(f"{setting} cannot be opened: {problem}")
        fix = "check that the file and its folder can be written, or wait for the process that holds its lock"
    else:
        fix = (f"check that PostgreSQL runs at {url.host}:{url.port or 5432} and takes this user, password and "
               "database, or wait for it")
    return UnusableDatabase(f"{setting}: the database is busy or unreachable ({reason}); {fix}, then try again.")


def check_sqlite_file(database_url: str) -> None:
    """UnusableDatabase for a SQLite file that cannot be opened, found before a connection tries: aiosqlite's
    thread reports a failed connect to an event loop that may have closed by then (a traceback at exit)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and (problem := sqlite_file_problem(url.database)):
        raise UnusableDatabase(f"DATABASE_URL={database_url} cannot be opened: {problem}")


def sqlite_file_problem(database: str | None) -> str | None:
    if not database:  # Settings refuses an in-memory database
        return None
    path = Path(database)
    if not path.parent.is_dir():
        return (f"the folder {path.parent} does not exist; create it, or point DATABASE_URL at a file in a folder "
                "that does.")
    if path.is_dir():
        return f"{path} is a folder; point DATABASE_URL at a file in it, such as sqlite:///{path / 'classify.db'}"
    if not os.access(path if path.exists() else path.parent, os.R_OK | os.W_OK):
        return (f"{path if path.exists() else path.parent} cannot be read and written by this user; change its "
                "permissions, or point DATABASE_URL elsewhere.")
    return None


def settings_or_exit() -> Settings:
    """The server's settings as main.py is imported. One that is not valid is said in one line, and the process
    exits before the importer (uvicorn) could print the import's traceback."""
    try:
        return load_settings()
    except ConfigurationError as exc:
        print(f"cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(STARTUP_FAILURE) from None


class StartupFailure:
    """ASGI middleware: a ConfigurationError raised as the app starts (its lifespan) is logged in one line, and
    start-up fails by the lifespan protocol with no other message; any other failure keeps its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_failure(message: Message) -> None:
            # Starlette sends the failure (a traceback as its message), then raises: only then is it known which.
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except ConfigurationError as exc:
            if not held:
                raise  # not at start-up
            logger.critical("cannot start: %s", exc)
            held[:] = [{"type": "lifespan.startup.failed", "message": ""}]
        finally:
            for message in held:
                await send(message)
