"""python cli.py: keys made, listed and revoked from the shell, with exit codes scripts can rely on; on SQLite
and on PostgreSQL."""

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from auth import KEY_PATTERN as KEY
from conftest import ROOT, b64, photo_path
from servers import free_port


def cli(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url, **env})


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres").create_database()
    return f"sqlite:///{tmp_path / 'keys.db'}"


def test_init_creates_the_database_and_one_first_key(database_url):
    first = cli(database_url, "init")
    assert first.returncode == 0, first.stderr
    assert KEY.fullmatch(first.stdout.splitlines()[-1])
    again = cli(database_url, "init")
    assert again.returncode == 0 and not KEY.search(again.stdout)


def test_create_key_prints_the_key_last_and_list_keys_never_shows_it(database_url):
    made = cli(database_url, "create-key", "--email", "ada@example.com", "--rate-limit", "7", "--window", "30")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[-1]
    assert KEY.fullmatch(key)
    cli(database_url, "create-key", "--email", "bob@example.com", DEFAULT_RATE_LIMIT="11", DEFAULT_WINDOW_S="5")
    table = cli(database_url, "list-keys")
    assert table.returncode == 0
    assert key[:11] in table.stdout and "ada@example.com" in table.stdout and "7/30s" in table.stdout
    assert "11/5s" in table.stdout
    assert key not in table.stdout and key[11:] not in table.stdout
    rows = json.loads(cli(database_url, "list-keys", "--json").stdout)
    assert [(r["email"], r["rate_limit"], r["window_s"], r["revoked"]) for r in rows] == [
        ("ada@example.com", 7, 30, None), ("bob@example.com", 11, 5, None)]


def test_revoke_by_prefix_or_key_and_clear_failures(database_url):
    first = cli(database_url, "create-key", "--email", "a@example.com").stdout.splitlines()[-1]
    second = cli(database_url, "create-key", "--email", "b@example.com").stdout.splitlines()[-1]
    ambiguous = cli(database_url, "revoke-key", "sk-")
    assert ambiguous.returncode == 1 and "2 keys match" in ambiguous.stderr
    unknown = cli(database_url, "revoke-key", "sk-" + "Z" * 43)
    assert unknown.returncode == 1 and "No key matches" in unknown.stderr
    too_long = cli(database_url, "revoke-key", first[:15])
    assert too_long.returncode == 1 and "at most 11 characters" in too_long.stderr
    assert cli(database_url, "revoke-key", first[:11]).returncode == 0
    assert cli(database_url, "revoke-key", second).returncode == 0
    rows = json.loads(cli(database_url, "list-keys", "--json").stdout)
    assert all(row["revoked"] for row in rows)


def test_an_unreachable_database_exits_3():
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/classify"  # nothing listens there
    done = cli(nowhere, "list-keys", DB_TIMEOUT_S="2")
    assert done.returncode == 3 and "busy or unreachable" in done.stderr


@pytest.mark.parametrize("args", [["create-key"], ["create-key", "--email", "x@y.z", "--rate-limit", "0"],
                                  ["create-key", "--email", "x@y.z", "--window", "soon"], ["fly"], []])
def test_bad_arguments_exit_2(tmp_path, args):
    database_url = f"sqlite:///{tmp_path / 'keys.db'}"
    assert cli(database_url, *args).returncode == 2


def test_a_key_created_while_the_server_runs_works_at_once(backend_server):
    made = cli(backend_server.database_url, "create-key", "--email", "live@example.com", "--rate-limit", "1")
    key = made.stdout.splitlines()[-1]
    with backend_server.client(key) as client:
        image = {"image": b64(photo_path("coffee.png").read_bytes())}
        assert client.post("/v1/classify", json=image).status_code == 200
        assert client.post("/v1/classify", json=image).status_code == 429  # its own limit, from the CLI


def test_revoking_while_the_server_writes_waits_for_its_turn(tmp_path):
    """A server commits its log rows all the time: the CLI must queue for the write lock before it reads, or
    SQLite refuses its write on a stale read ("database is locked") as soon as a commit falls in between."""
    database_url = f"sqlite:///{tmp_path / 'keys.db'}"
    keys = [cli(database_url, "create-key", "--email", f"busy{i}@example.com").stdout.splitlines()[-1] for i in range(5)]
    stop = threading.Event()

    def write_constantly() -> None:
        writer = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None, timeout=10)
        while not stop.is_set():
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO request_log (key_id, endpoint, method, status_code, latency_ms, created_at_ms) "
                           "VALUES (NULL, '/v1/models', 'GET', 401, 1.0, 0)")
            writer.execute("COMMIT")
            stop.wait(0.005)  # a busy server: 200 commits a second
        writer.close()

    writer = threading.Thread(target=write_constantly)
    writer.start()
    try:
        revokes = [cli(database_url, "revoke-key", key) for key in keys]
    finally:
        stop.set()
        writer.join()
    assert [r.returncode for r in revokes] == [0] * 5, [r.stderr for r in revokes]
    assert all(row["revoked"] for row in json.loads(cli(database_url, "list-keys", "--json").stdout))
