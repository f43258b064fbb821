"""Headers for browsers: CORS only for the origins in CORS_ORIGINS, and security headers on every answer."""

import re
import sqlite3

import pytest

from conftest import ONE_PIXEL, assert_error, key_id, log_rows, make_key, scrape, value

ALLOWED = "https://app.example.com"
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def preflight(client, origin: str):
    return client.options("/v1/classify", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "authorization,content-type,x-request-id"})


def test_an_allowed_origin_may_call_the_api_and_read_its_headers(start_server):
    running = start_server({"CORS_ORIGINS": f"{ALLOWED}, https://other.example.org/"})
    key = make_key(running.database_url)
    with running.client() as client:
        allowed = preflight(client, ALLOWED)
        assert allowed.status_code == 200 and allowed.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert {"authorization", "content-type", "x-request-id"} <= {
            name.strip().lower() for name in allowed.headers["Access-Control-Allow-Headers"].split(",")}
        response = client.post("/v1/classify", json={"image": ONE_PIXEL},
                               headers={"Origin": ALLOWED, "Authorization": f"Bearer {key}"})
        assert response.status_code == 200 and response.headers["Access-Control-Allow-Origin"] == ALLOWED
        exposed = {name.strip().lower() for name in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"x-ratelimit-remaining", "ratelimit", "retry-after", "x-request-id", "server-timing"} <= exposed
        refused = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers={"Origin": ALLOWED})
        assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == ALLOWED  # readable
        other = preflight(client, "https://other.example.org")  # the trailing slash in the setting is forgiven
        assert other.headers["Access-Control-Allow-Origin"] == "https://other.example.org"

        evil = preflight(client, "https://evil.example")
        assert evil.status_code == 400 and "Access-Control-Allow-Origin" not in evil.headers
        stolen = client.post("/v1/classify", json={"image": ONE_PIXEL},
                             headers={"Origin": "https://evil.example", "Authorization": f"Bearer {key}"})
        assert "Access-Control-Allow-Origin" not in stolen.headers


def test_preflights_to_v1_are_logged_counted_and_recorded(start_server):
    """The README's promise: every /v1 request is a row. CORSMiddleware answers preflights by itself, so the
    request log sits outside it."""
    running = start_server({"CORS_ORIGINS": ALLOWED})
    before = scrape(running.url)
    with running.client() as client:
        assert preflight(client, ALLOWED).status_code == 200
        assert preflight(client, "https://evil.example").status_code == 400
    rows = log_rows(running.database_url, "method = 'OPTIONS'")
    assert [(row["endpoint"], row["status_code"]) for row in rows] == [("/v1/classify", 200), ("/v1/classify", 400)]
    after = scrape(running.url)
    for status in ("200", "400"):  # no route ran: labelled as 404s are, not by the path
        assert value(after, "http_requests_total", route="unmatched", status=status) - value(
            before, "http_requests_total", route="unmatched", status=status) == 1
    assert len(re.findall(r"OPTIONS unmatched (200|400) ", running.log())) == 2


def test_the_request_logs_own_answers_are_readable_by_an_allowed_origin(start_server):
    """The answers the request log gives instead of the app's (a 503 when the row cannot be written, the 500 of
    an unexpected failure) carry the CORS headers the app's answers do."""
    running = start_server({"CORS_ORIGINS": ALLOWED, "DB_TIMEOUT_S": "0.5"})
    key = make_key(running.database_url)
    database = running.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as broken:  # a window no code path writes: the limiter fails, a 500
        broken.execute("UPDATE api_keys SET window_s = 'soon' WHERE id = ?", (key_id(running.database_url, key),))
    origin = {"Origin": ALLOWED}
    with running.client(key) as client:
        failed = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=origin)
        blocker = sqlite3.connect(database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the row cannot be written: a 503 instead of the 200
        try:
            unlogged = client.get("/v1/models", headers=origin)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    assert (unlogged.status_code, failed.status_code) == (503, 500)
    for response in (unlogged, failed):
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "x-request-id" in response.headers["Access-Control-Expose-Headers"].lower()


def test_no_origin_is_allowed_by_default(server):
    with server.client() as client:
        refused = preflight(client, ALLOWED)
        assert "Access-Control-Allow-Origin" not in refused.headers
        assert_error(refused, 405, "method_not_allowed")  # no CORS handling at all, as the README says
        response = client.get("/v1/models", headers={"Origin": ALLOWED})
        assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("method, path", [("GET", "/healthz"), ("GET", "/v1/models"), ("POST", "/v1/classify"),
                                          ("GET", "/metrics"), ("GET", "/nowhere"), ("GET", "/openapi.json")])
def test_api_answers_are_not_sniffed_cached_or_framed(server, method, path):
    with server.client() as client:
        response = client.request(method, path)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Security-Policy"] == API_CSP


def test_pages_keep_their_own_policy_and_no_banner_has_a_version(server):
    with server.client() as client:
        page, script, docs = client.get("/"), client.get("/static/app.js"), client.get("/docs")
        docs_files = [client.get(url) for url in re.findall(r'(?:src|href)="([^"]+)"', docs.text)]
    for response in (page, script, docs):
        assert response.status_code == 200 and response.headers["X-Content-Type-Options"] == "nosniff"
        assert not re.search(r"\d", response.headers.get("server", "")), response.headers["server"]
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self';")  # main.PAGE_HEADERS
    docs_policy = docs.headers["Content-Security-Policy"]  # api_docs.py: Swagger UI's files come from /static
    assert docs_policy.startswith("default-src 'self';") and "http" not in docs_policy and "*" not in docs_policy
    assert len(docs_files) == 3 and all(file.status_code == 200 for file in docs_files)  # script, style, icon
    assert "no-store" not in script.headers.get("Cache-Control", "")  # static files may be cached
