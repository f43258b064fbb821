"""Real PostgreSQL and Redis servers for the tests: each in its own temporary directory, on a free loopback
port, without persistence worth keeping, stopped (and removed) when done.

PostgreSQL refuses to run as root, so as root its commands run as the `postgres` user (Debian's package
makes it). Where a binary is missing, `require_binary` skips the test, or fails it under CI=1 (CI must run them).
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def find_binary(name: str) -> str | None:
    """`name` on PATH, or in Debian's versioned PostgreSQL folder (which is not on PATH)."""
    versioned = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (versioned[-1] if versioned else None)


def require_binary(name: str, package: str) -> str:
    path = find_binary(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install {package}); .ci/run installs it"
        if is_ci():
            pytest.fail(f"CI must run the {package} tests, but {reason}")
        pytest.skip(reason)
    return path


def wait_for_port(port: int, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port}:\n{log.read_text(errors='replace') if log.exists() else ''}")


NOTHING_TO_KEEP = {"fsync": "off", "full_page_writes": "off"}  # tests: faster, and nothing here must last


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb), serving 127.0.0.1:port, with `options` (-c name=value) added."""

    def __init__(self, options: dict[str, str] | None = None) -> None:
        self.options = NOTHING_TO_KEEP if options is None else options
        initdb = require_binary("initdb", "postgresql")
        self.bin = Path(initdb).resolve().parent
        self.dir = Path(tempfile.mkdtemp(prefix="classify-pg-"))  # not under pytest's root-only temp dir
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = free_port()
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._databases = 0

    def _run(self, *command: str) -> None:
        subprocess.run([*self.run_as, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> "PostgresServer":
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200"
        options += "".join(f" -c {name}={value}" for name, value in self.options.items())
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "start")
        return self

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        self._databases += 1
        name = f"classify_{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """A redis-server of its own on 127.0.0.1:port, with no snapshots and no append-only file."""

    def __init__(self) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix="classify-redis-"))
        self.log_path = self.dir / "redis.log"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.dir), "--logfile", str(self.log_path)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, "redis-server", self.log_path)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
