"""python cli.py: keys made, listed and revoked from the shell, with exit codes scripts can rely on; on SQLite
and on PostgreSQL."""

import json
import sqlite3
import threading
import time

import pytest

from cli import iso_time
from conftest import b64, log_rows, photo_path, query, run_cli
from ledger.keys import KEY_PATTERN as KEY
from servers import free_port

cli = run_cli


@pytest.fixture
def database(database_url: str) -> str:
    """A new database with the schema, as `cli.py migrate` makes it: the other commands create none."""
    done = cli(database_url, "migrate")
    assert done.returncode == 0, done.stderr
    return database_url


def test_init_creates_the_database_and_one_first_key(database_url):
    first = cli(database_url, "init")
    assert first.returncode == 0, first.stderr
    assert KEY.fullmatch(first.stdout.splitlines()[-1])
    again = cli(database_url, "init")
    assert again.returncode == 0 and not KEY.search(again.stdout)


@pytest.mark.parametrize("command", [["list-keys"], ["create-key", "--email", "a@example.com"],
                                     ["set-limit", "sk-Qm3xTz8b", "--rate-limit", "5"], ["rotate-key", "sk-Qm3xTz8b"],
                                     ["revoke-key", "sk-Qm3xTz8b"]])
def test_only_init_and_migrate_create_a_sqlite_file(tmp_path, command):
    """A SQLite file moved away must not be replaced by an empty one that a running server would switch to."""
    path = tmp_path / "classify.db"
    refused = cli(f"sqlite:///{path}", *command)
    assert refused.returncode == 3 and not refused.stdout, refused.stderr
    assert f"no database file at {path}" in refused.stderr and "cli.py init" in refused.stderr
    assert "-wal and -shm" in refused.stderr
    assert list(tmp_path.iterdir()) == []  # no file, no -wal, no -shm
    assert cli(f"sqlite:///{path}", "migrate").returncode == 0 and path.is_file()


def test_create_key_prints_the_key_last_and_list_keys_never_shows_it(database):
    database_url = database
    made = cli(database_url, "create-key", "--email", "ada@example.com", "--rate-limit", "7", "--window", "30")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[-1]
    assert KEY.fullmatch(key)
    cli(database_url, "create-key", "--email", "bob@example.com", DEFAULT_RATE_LIMIT="11", DEFAULT_WINDOW_S="5")
    table = cli(database_url, "list-keys")
    assert table.returncode == 0
    header, ada, bob = table.stdout.splitlines()
    assert header.split() == ["PREFIX", "EMAIL", "LIMIT", "WINDOW", "CREATED", "(UTC)", "LAST", "USED", "REVOKED"]
    assert ada.split()[:4] == [key[:11], "ada@example.com", "7", "30s"] and ada.split()[-2:] == ["-", "-"]
    assert bob.split()[2:4] == ["11", "5s"]
    assert key not in table.stdout and key[11:] not in table.stdout
    rows = json.loads(cli(database_url, "list-keys", "--json").stdout)
    assert [(r["email"], r["rate_limit"], r["window_s"], r["last_used"], r["revoked"]) for r in rows] == [
        ("ada@example.com", 7, 30, None, None), ("bob@example.com", 11, 5, None, None)]
    assert set(rows[0]) == {"prefix", "email", "rate_limit", "window_s", "created", "last_used", "revoked"}


def test_revoke_by_prefix_or_key_and_clear_failures(database):
    database_url = database
    first = cli(database_url, "create-key", "--email", "a@example.com").stdout.splitlines()[-1]
    second = cli(database_url, "create-key", "--email", "b@example.com").stdout.splitlines()[-1]
    too_short = cli(database_url, "revoke-key", "sk-")  # say, an unset $KEY: it must not match every key
    assert too_short.returncode == 1 and "too short" in too_short.stderr
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
                                  ["create-key", "--email", "x@y.z", "--window", "soon"], ["fly"], [],
                                  ["set-limit", "sk-"], ["set-limit", "sk-", "--rate-limit", "-3"],
                                  ["set-limit", "sk-", "--rate-limit", "5", "--window", "0"], ["rotate-key"]])
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
    assert cli(database_url, "migrate").returncode == 0
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


def new_key(database_url: str, email: str = "a@example.com", *options: str) -> str:
    made = cli(database_url, "create-key", "--email", email, *options)
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[-1]


@pytest.mark.parametrize("command", [["set-limit", "--rate-limit", "5"], ["rotate-key"], ["revoke-key"]])
def test_commands_that_take_a_key_refuse_unknown_and_ambiguous_ones_with_exit_1(database, command):
    database_url = database
    first = new_key(database_url, "a@example.com")
    new_key(database_url, "b@example.com")
    # Two display prefixes that share their first 7 characters, as random ones rarely do.
    query(database_url, "UPDATE api_keys SET prefix = 'sk-Ambg' || substr(prefix, 8)")
    name, *options = command
    for given, words in [("sk-Ambg", "2 keys match"), ("", "too short"), ("sk-", "too short"),
                         ("sk-" + "Z" * 43, "No key matches"), ("sk-ZZZZZZZZ", "No key matches"),
                         (first[:15], "at most 11 characters")]:
        failed = cli(database_url, name, given, *options)
        assert failed.returncode == 1 and words in failed.stderr and not failed.stdout, (given, failed.stderr)
    rows = json.loads(cli(database_url, "list-keys", "--json").stdout)
    assert [(r["rate_limit"], r["revoked"]) for r in rows] == [(60, None), (60, None)]  # nothing changed


def test_list_keys_shows_when_each_key_was_last_used(server):
    used = new_key(server.database_url, "used@example.com")
    idle = new_key(server.database_url, "idle@example.com")
    with server.client(used) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/v1/classify", json={"image": "aGk="}).status_code == 400  # failures count as use too
    rows = {r["prefix"]: r for r in json.loads(cli(server.database_url, "list-keys", "--json").stdout)}
    last = log_rows(server.database_url, "key_id = (SELECT id FROM api_keys WHERE prefix = :prefix)",
                    prefix=used[:11])[-1]
    assert rows[used[:11]]["last_used"] == iso_time(last["created_at_ms"])
    assert rows[idle[:11]]["last_used"] is None
    table = cli(server.database_url, "list-keys").stdout
    line = next(line for line in table.splitlines() if line.startswith(used[:11]))
    assert line.split()[-2:] == [iso_time(last["created_at_ms"])[11:16], "-"]  # last used hh:mm; not revoked


def test_set_limit_applies_once_the_servers_key_cache_expires(start_server):
    server = start_server({"KEY_CACHE_TTL_S": "1"})
    key = new_key(server.database_url, "grow@example.com", "--rate-limit", "1", "--window", "600")
    with server.client(key) as client:
        image = {"image": b64(photo_path("coffee.png").read_bytes())}
        assert client.post("/v1/classify", json=image).status_code == 200
        assert client.post("/v1/classify", json=image).status_code == 429
        changed = cli(server.database_url, "set-limit", key[:11], "--rate-limit", "3")
        assert changed.returncode == 0, changed.stderr
        assert "3 requests per 600 s (was 1 per 600 s)" in changed.stdout
        time.sleep(1.2)  # KEY_CACHE_TTL_S: until then the server may use the key as it read it
        allowed = client.post("/v1/classify", json=image)
        assert allowed.status_code == 200 and allowed.headers["X-RateLimit-Limit"] == "3"
    assert cli(server.database_url, "set-limit", key, "--rate-limit", "9", "--window", "30").returncode == 0
    row = next(r for r in json.loads(cli(server.database_url, "list-keys", "--json").stdout) if r["prefix"] == key[:11])
    assert (row["rate_limit"], row["window_s"]) == (9, 30)


def test_create_key_and_rotate_key_print_one_json_object_for_scripts(database):
    made = cli(database, "create-key", "--email", "ci@example.com", "--rate-limit", "9", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)  # the whole of stdout: one object, nothing else
    assert KEY.fullmatch(created["key"]) and created["prefix"] == created["key"][:11]
    assert (created["email"], created["rate_limit"], created["window_s"]) == ("ci@example.com", 9, 60)
    assert created["created"] == json.loads(cli(database, "list-keys", "--json").stdout)[0]["created"]
    rotated = cli(database, "rotate-key", created["prefix"], "--json")
    assert rotated.returncode == 0, rotated.stderr
    replacement = json.loads(rotated.stdout)
    assert KEY.fullmatch(replacement["key"]) and replacement["key"] != created["key"]
    assert replacement["replaces"] == created["prefix"] and replacement["rate_limit"] == 9
    rows = {row["prefix"]: row for row in json.loads(cli(database, "list-keys", "--json").stdout)}
    assert rows[created["prefix"]]["revoked"] and rows[replacement["prefix"]]["revoked"] is None


def test_set_limit_may_change_the_window_alone_and_says_when_servers_apply_it(database):
    key = new_key(database, "w@example.com", "--rate-limit", "7", "--window", "30")
    changed = cli(database, "set-limit", key[:11], "--window", "10", KEY_CACHE_TTL_S="3")
    assert changed.returncode == 0, changed.stderr
    assert "7 requests per 10 s (was 7 per 30 s)" in changed.stdout
    assert "within KEY_CACHE_TTL_S (3 s)" in changed.stdout and "next request" not in changed.stdout
    [row] = json.loads(cli(database, "list-keys", "--json").stdout)
    assert (row["rate_limit"], row["window_s"]) == (7, 10)
    neither = cli(database, "set-limit", key[:11])
    assert neither.returncode == 2 and "--rate-limit, --window, or both" in neither.stderr
    revoked = cli(database, "revoke-key", key[:11], KEY_CACHE_TTL_S="3")
    assert revoked.returncode == 0 and "refuse it within KEY_CACHE_TTL_S (3 s)" in revoked.stdout


def test_rotate_key_replaces_a_key_with_the_same_owner_and_limit(server):
    old = new_key(server.database_url, "turn@example.com", "--rate-limit", "17", "--window", "45")
    rotated = cli(server.database_url, "rotate-key", old[:11])
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.splitlines()[-1]
    assert KEY.fullmatch(new) and new != old and old not in rotated.stdout
    with server.client(old) as client:
        assert client.get("/v1/models").json()["error"]["code"] == "revoked_api_key"
    with server.client(new) as client:
        assert client.get("/v1/models").status_code == 200
    rows = {r["prefix"]: r for r in json.loads(cli(server.database_url, "list-keys", "--json").stdout)}
    assert rows[old[:11]]["revoked"] and rows[new[:11]]["revoked"] is None
    assert [(rows[k[:11]]["email"], rows[k[:11]]["rate_limit"], rows[k[:11]]["window_s"]) for k in (old, new)] == [
        ("turn@example.com", 17, 45)] * 2
    again = cli(server.database_url, "rotate-key", old)
    assert again.returncode == 1 and "was revoked" in again.stderr and not again.stdout
