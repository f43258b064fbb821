"""Bearer keys: every way of not having a valid one is a 401; keys are stored and logged only as hashes."""

import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_error, b64, key_id, log_rows, make_key, photo_path, raw_http
from settings import Settings

VALID_LOOKING_UNKNOWN = "sk-" + "A" * 43

BAD_AUTHORIZATION = {
    "no header": (None, "missing_api_key"),
    "basic scheme": ("Basic dXNlcjpwYXNz", "malformed_authorization"),
    "bearer without token": ("Bearer", "malformed_authorization"),
    "unknown key": (f"Bearer {VALID_LOOKING_UNKNOWN}", "invalid_api_key"),
    "5000 characters": ("Bearer sk-" + "x" * 4997, "invalid_api_key"),
    "sql fragment": ("Bearer sk-' OR '1'='1' --", "invalid_api_key"),
    "sql fragment 2": ("Bearer x'; DROP TABLE api_keys; --", "invalid_api_key"),
}


@pytest.mark.parametrize("case", BAD_AUTHORIZATION)
@pytest.mark.parametrize("method, path", [("POST", "/v1/classify"), ("GET", "/v1/usage"), ("GET", "/v1/models")])
def test_no_valid_key_is_401_with_a_bearer_challenge(server, cat_png, case, method, path):
    authorization, code = BAD_AUTHORIZATION[case]
    headers = {"Authorization": authorization} if authorization else {}
    with server.client() as client:
        response = client.request(method, path, headers=headers,
                                  json={"image": b64(cat_png)} if method == "POST" else None)
    assert_error(response, 401, code)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "x-ratelimit-limit" not in response.headers


@pytest.mark.parametrize("backend_server", ["sqlite", "postgresql"], indirect=True)
def test_revoked_key_is_401_once_its_cached_lookup_expires(backend_server, cat_png):
    server = backend_server  # SQLite or PostgreSQL
    key = make_key(server.database_url)
    with server.client(key) as client:
        assert client.post("/v1/classify", json={"image": b64(cat_png)}).status_code == 200
        revoke = subprocess.run([sys.executable, "cli.py", "revoke-key", key], cwd=ROOT, capture_output=True, text=True,
                                env={"DATABASE_URL": server.database_url, "PATH": "/usr/bin:/bin"})
        assert revoke.returncode == 0, revoke.stderr
        time.sleep(Settings.model_fields["key_cache_ttl_s"].default)  # the key was read, so it is cached that long
        assert_error(client.post("/v1/classify", json={"image": b64(cat_png)}), 401, "revoked_api_key")
        assert_error(client.get("/v1/usage"), 401, "revoked_api_key")
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert [(row["status_code"], row["error_code"]) for row in rows] == [
        (200, None), (401, "revoked_api_key"), (401, "revoked_api_key")]  # a known key, even revoked


def test_a_request_without_a_valid_key_is_refused_before_its_body_arrives(server):
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + VALID_LOOKING_UNKNOWN.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
    status, _, _ = raw_http(server.port, head)  # no body sent: if the server read it first, this would time out
    assert status == 401


def test_no_usable_key_in_the_database_its_wal_or_the_log(start_server, tmp_path):
    running = start_server(tmp=tmp_path)
    key = make_key(running.database_url)
    with running.client(key) as client:
        for _ in range(3):
            client.post("/v1/classify", json={"image": b64(photo_path("coffee.png").read_bytes())}).raise_for_status()
        client.get("/v1/usage").raise_for_status()
        assert client.post("/v1/classify", json={"image": "junk"}).status_code == 400
    secret_part = key[len("sk-") + 8:].encode()  # everything after the display prefix
    assert any(path.name.endswith("-wal") for path in tmp_path.glob("classify.db*"))
    for is_running in (True, False):  # while the WAL holds recent writes, and after shutdown's checkpoint
        for path in [*tmp_path.glob("classify.db*"), running.log_path]:
            assert secret_part not in path.read_bytes(), f"the key is in {path.name}"
        running.stop()
