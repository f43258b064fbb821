"""Several server processes on one PostgreSQL (and one Redis): one exact limit, one ledger, cached keys that
still get revoked everywhere, and 503s (never 500s, never unlimited admission) while a backend is down."""

import asyncio
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from sqlalchemy import make_url

from conftest import ONE_PIXEL, Server, assert_error, backend_env, make_key, run_cli
from servers import PostgresServer, RedisServer
from settings import Settings

RECOVERY_TIMEOUT_S = 60


def split_burst(servers: list[Server], key: str, count: int) -> list[httpx.Response]:
    """`count` classify requests at once, dealt in turn to each server, each on its own connection."""
    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        clients = [httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     limits=limits) for s in servers]
        try:
            return await asyncio.gather(*[clients[i % len(clients)].post("/v1/classify", json={"image": ONE_PIXEL})
                                          for i in range(count)])
        finally:
            for client in clients:
                await client.aclose()

    return asyncio.run(send_all())


def revoke(database_url: str, key: str) -> None:
    done = run_cli(database_url, "revoke-key", key)
    assert done.returncode == 0, done.stderr


def wait_until_ready(server: Server) -> None:
    """Polls /readyz until 200: the server must come back by itself, with no restart."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    with server.client() as client:
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)


@pytest.mark.parametrize("backend_server", ["sqlite", "sqlite+redis", "postgresql", "postgresql+redis"], indirect=True)
def test_two_servers_admit_exactly_the_limit_and_read_the_same_usage(backend_server, start_server):
    other = start_server(backend_server.backend_env)
    key = make_key(backend_server.database_url, rate_limit=5, window_s=60)
    responses = split_burst([backend_server, other], key, 20)
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 15
    for server in (backend_server, other):
        with server.client(key) as client:
            usage = client.get("/v1/usage").json()
        assert (usage["total_requests"], usage["successful_requests"], usage["remaining"]) == (20, 5, 0)


@pytest.mark.parametrize("backend_server", ["postgresql"], indirect=True)
def test_a_revoked_key_stops_on_every_server_within_its_cache_ttl(backend_server, start_server):
    """A second server that trusts keys for an hour shows the lookup is cached; the first, with the default
    KEY_CACHE_TTL_S, refuses the revoked key once that has passed."""
    trusting = start_server({**backend_server.backend_env, "KEY_CACHE_TTL_S": "3600"})
    key = make_key(backend_server.database_url)
    for server in (backend_server, trusting):
        with server.client(key) as client:
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    revoke(backend_server.database_url, key)
    time.sleep(Settings.model_fields["key_cache_ttl_s"].default)
    with backend_server.client(key) as client:
        assert_error(client.post("/v1/classify", json={"image": ONE_PIXEL}), 401, "revoked_api_key")
    with trusting.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200  # read before the revocation


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server this test may stop and start."""
    running = PostgresServer().start()
    yield running
    running.remove()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may stop and start."""
    running = RedisServer().start()
    yield running
    running.remove()


def test_postgresql_down_is_503_with_retry_after_and_recovers_without_restart(own_postgres, start_server):
    running = start_server({"DATABASE_URL": own_postgres.create_database()})
    key = make_key(running.database_url)
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.get("/v1/usage").status_code == 200  # its reading thread's connection is then pooled
        own_postgres.stop()
        assert_error(client.get("/readyz"), 503, "not_ready")
        for response in (client.post("/v1/classify", json={"image": ONE_PIXEL}), client.get("/v1/usage"),
                         client.get("/v1/models")):
            assert_error(response, 503, "database_unavailable")
            assert response.headers["Retry-After"] == "1"
        own_postgres.start()
        wait_until_ready(running)
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.get("/v1/usage").json()["total_requests"] >= 2
    assert "Traceback" not in running.log()


def test_a_lock_held_longer_than_db_timeout_is_a_503_not_a_wait(request, start_server, tmp_path):
    """PostgreSQL's counterpart of SQLite's busy lock: with the request log locked elsewhere, the row waits
    DB_TIMEOUT_S (lock_timeout), then the client gets a 503 instead of its answer; afterwards all is well."""
    running = start_server({**backend_env(request, "postgresql", tmp_path), "DB_TIMEOUT_S": "1"})
    key = make_key(running.database_url)
    url = make_url(running.database_url)
    with running.client(key) as client:
        assert client.get("/v1/models").status_code == 200
        with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database) as blocker:
            blocker.execute("LOCK TABLE request_log IN ACCESS EXCLUSIVE MODE")
            refused = client.get("/v1/models")
        assert_error(refused, 503, "database_unavailable")
        assert refused.headers["Retry-After"] == "1"
        assert client.get("/v1/models").status_code == 200
    assert "Traceback" not in running.log()


def test_redis_down_is_503_with_retry_after_and_recovers_without_restart(own_redis, request, start_server, tmp_path):
    env = {**backend_env(request, "postgresql", tmp_path), "REDIS_URL": own_redis.url}
    running = start_server(env)
    key = make_key(running.database_url, rate_limit=1000)
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        own_redis.stop()
        assert_error(client.get("/readyz"), 503, "not_ready")
        for response in (client.post("/v1/classify", json={"image": ONE_PIXEL}), client.get("/v1/usage")):
            assert_error(response, 503, "rate_limiter_unavailable")  # refused, not admitted unlimited
            assert response.headers["Retry-After"] == "1"
        own_redis.start()
        wait_until_ready(running)
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    assert "Traceback" not in running.log()
