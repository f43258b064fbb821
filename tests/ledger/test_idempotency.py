"""Idempotency keys through the real server (and the client's process): a repeat gets the stored answer,
uncharged, unrun and logged as a replay; another body is a 422, a repeat of a running request a 409; only 200s
are kept; exact under concurrency on one process, two workers and two hosts; kept across restarts; pruned."""

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from client import Client, InvalidRequest
from conftest import (ONE_PIXEL, Server, assert_error, b64, backend_env, client_cli, encode, key_id, log_rows, make_key,
                      query, raw_http, scrape, server_env, value)

BODIES = {"/v1/classify": {"image": ONE_PIXEL, "top_k": 3}, "/v1/embeddings": {"image": ONE_PIXEL}}


def keyed(idempotency_key: str) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key}


def images_run(*servers: Server) -> float:
    """Images the model has run on these servers (all their workers), from /metrics."""
    return sum(value(scrape(server.url), "inference_batch_size_sum") for server in servers)


def hits(database_url: str, key: str) -> int:
    """Admissions the database limiter holds for `key`."""
    return query(database_url, "SELECT COUNT(*) AS n FROM rate_limit_hits WHERE key_id = :id",
                 id=key_id(database_url, key))[0]["n"]


def replayed_flags(database_url: str, key: str) -> list[bool]:
    return [bool(row["replayed"]) for row in log_rows(database_url, "key_id = :id", id=key_id(database_url, key))]


@pytest.mark.parametrize("endpoint", BODIES)
def test_an_idempotency_key_must_be_1_to_255_printable_ascii_characters(api, endpoint):
    for bad in ["", "x" * 256, b"caf\xe9", "tab\tinside"]:
        response = api.post(endpoint, json=BODIES[endpoint], headers={"Idempotency-Key": bad})
        assert "Idempotency-Key" in assert_error(response, 400, "invalid_idempotency_key")["message"]
    two = api.post(endpoint, json=BODIES[endpoint], headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    assert_error(two, 400, "invalid_idempotency_key")
    assert api.post(endpoint, json=BODIES[endpoint], headers=keyed("~ " + "x" * 253)).status_code == 200


@pytest.mark.parametrize("endpoint", BODIES)
def test_a_repeat_gets_the_stored_answer_unrun_uncharged_and_logged_as_a_replay(server, api, key, endpoint):
    before = images_run(server)
    first = api.post(endpoint, json=BODIES[endpoint], headers=keyed("order-1"))
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    # The same request, however its JSON is spaced and ordered.
    again = api.post(endpoint, content=json.dumps(BODIES[endpoint], indent=2, sort_keys=True),
                     headers={**keyed("order-1"), "Content-Type": "application/json"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content and again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]  # the answer is stored, not its request
    assert images_run(server) - before == 1
    assert hits(server.database_url, key) == 1
    assert replayed_flags(server.database_url, key) == [False, True]
    if endpoint == "/v1/classify":
        assert api.get("/v1/usage").json()["total_requests"] == 1


def test_the_same_key_with_another_body_is_a_422_and_keys_are_per_api_key(server, api, key):
    assert api.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("k")).status_code == 200
    for other in ({"image": ONE_PIXEL, "top_k": 2}, {"images": [ONE_PIXEL]}):
        assert_error(api.post("/v1/classify", json=other, headers=keyed("k")), 422, "idempotency_key_reused")
    assert_error(api.post("/v1/embeddings", json={"image": ONE_PIXEL}, headers=keyed("k")), 422,
                 "idempotency_key_reused")
    assert hits(server.database_url, key) == 1  # refusals of repeats count nothing
    with server.client(make_key(server.database_url)) as someone_else:
        answer = someone_else.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("k"))
    assert answer.status_code == 200 and "Idempotent-Replayed" not in answer.headers


def test_base64_text_and_a_file_holding_that_text_are_two_requests(server, api, key):
    """{"image": B64} with a key, then a multipart upload whose file's bytes are the text B64 with the same key:
    the second was answered with the first's answer; it is another request (alone, a 400 not_an_image)."""
    image = b64(encode(Image.new("RGB", (3, 2), "red"), "PNG"))
    first = api.post("/v1/classify", json={"image": image}, headers=keyed("kind"))
    assert first.status_code == 200
    as_file = api.post("/v1/classify", files={"file": ("image.txt", image.encode())}, headers=keyed("kind"))
    assert_error(as_file, 422, "idempotency_key_reused")
    assert_error(api.post("/v1/classify", files={"file": ("image.txt", image.encode())}), 400, "not_an_image")
    again = api.post("/v1/classify", json={"image": image}, headers=keyed("kind"))
    assert again.headers["Idempotent-Replayed"] == "true" and again.content == first.content


def legacy_hash(path: str, body: dict, image: bytes) -> str:
    """The hash releases before the source's kind was hashed stored: the endpoint and options as sorted JSON,
    then each image's length and bytes."""
    options = {"path": path, "is_list": False, "top_k": body.get("top_k", 5), "min_confidence": 0.0,
               "encoding_format": "float"}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(len(image).to_bytes(8, "big") + image)
    return digest.hexdigest()


def test_an_answer_stored_by_an_older_release_is_still_replayed(server, api, key):
    """Its hash has no kind in it: an identical repeat after the upgrade gets it, rather than a 422."""
    answer = json.dumps({"id": "clf_stored_before_the_upgrade", "model": "efficientnet_lite0"})
    query(server.database_url, "INSERT INTO idempotency_keys (key_id, idempotency_key, request_hash, owner, status_code, "
                               "response_headers, response_body, created_at_ms, expires_at_ms) VALUES (:id, 'before', "
                               ":hash, 'o', 200, '{\"content-type\": \"application/json\"}', :body, 0, :expires)",
          id=key_id(server.database_url, key), hash=legacy_hash("/v1/classify", {"top_k": 3}, ONE_PIXEL.encode()),
          body=answer.encode(), expires=time.time_ns() // 10**6 + 3_600_000)
    again = api.post("/v1/classify", json={"image": ONE_PIXEL, "top_k": 3}, headers=keyed("before"))
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.text == answer
    assert_error(api.post("/v1/classify", json={"image": ONE_PIXEL, "top_k": 2}, headers=keyed("before")), 422,
                 "idempotency_key_reused")


def test_a_replay_is_answered_even_when_the_window_is_full(server):
    key = make_key(server.database_url, rate_limit=1, window_s=3600)
    with server.client(key) as client:
        first = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("once"))
        assert first.status_code == 200
        assert_error(client.post("/v1/classify", json={"image": ONE_PIXEL}), 429, "rate_limit_exceeded")
        again = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("once"))
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content


def test_answers_other_than_200_are_not_stored_so_a_retry_is_processed_again(server):
    key = make_key(server.database_url, rate_limit=2, window_s=2)
    broken = b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with server.client(key) as client:
        for _ in range(2):
            response = client.post("/v1/classify", json={"image": broken}, headers=keyed("bad"))
            assert response.status_code == 400 and "Idempotent-Replayed" not in response.headers
        assert_error(client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("full")), 429)
        time.sleep(2.1)  # the window empties
        processed = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("full"))
        assert processed.status_code == 200 and "Idempotent-Replayed" not in processed.headers
        replayed = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("full"))
        assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed_flags(server.database_url, key) == [False, False, False, False, True]


SLOW_SIDE = 9000  # 81 MP: about a second to decode, in a 0.3 MB PNG


@pytest.fixture(scope="module")
def slow_image() -> bytes:
    """A PNG whose decoding takes the server about a second: a request of it is still running for a while."""
    ramp = np.linspace(0, 255, SLOW_SIDE, dtype=np.uint8)
    pixels = np.empty((SLOW_SIDE, SLOW_SIDE, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = ramp[None, :], ramp[:, None], 128
    return encode(Image.fromarray(pixels), "PNG")


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that accepts the slow image."""
    tmp = tmp_path_factory.mktemp("slow")
    running = Server(tmp, server_env(tmp, MAX_IMAGE_PIXELS=str(SLOW_SIDE ** 2))).start()
    yield running
    running.stop()


def wait_for_claim(database_url: str, key: str) -> None:
    """Until the key's first request has claimed its Idempotency-Key: it is running from then on."""
    deadline = time.monotonic() + 30
    while not query(database_url, "SELECT COUNT(*) AS n FROM idempotency_keys WHERE key_id = :id",
                    id=key_id(database_url, key))[0]["n"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_repeat_while_the_first_is_running_is_a_409_with_retry_after(slow_server, slow_image):
    key = make_key(slow_server.database_url)
    body = {"image": b64(slow_image)}
    answers: list[httpx.Response] = []
    with slow_server.client(key) as client:
        first = threading.Thread(target=lambda: answers.append(
            client.post("/v1/classify", json=body, headers=keyed("slow"))))
        first.start()
        wait_for_claim(slow_server.database_url, key)
        in_use = client.post("/v1/classify", json=body, headers=keyed("slow"))
        first.join()
        assert_error(in_use, 409, "idempotency_key_in_use")
        assert in_use.headers["Retry-After"] == "1"
        rows = log_rows(slow_server.database_url, "key_id = :id", id=key_id(slow_server.database_url, key))
        assert [row["error_code"] for row in rows if row["status_code"] == 409] == ["idempotency_key_in_use"]
        assert answers[0].status_code == 200
        again = client.post("/v1/classify", json=body, headers=keyed("slow"))
    assert again.headers["Idempotent-Replayed"] == "true" and again.content == answers[0].content
    assert hits(slow_server.database_url, key) == 1


def test_the_clients_retries_after_a_read_timeout_are_charged_and_run_once(slow_server, slow_image, tmp_path):
    """The first attempt times out (the server takes a second); the server finishes it anyway, and the
    retries, with the same key, get a 409 while it runs and then its stored answer."""
    key = make_key(slow_server.database_url)
    photo = tmp_path / "slow.png"
    photo.write_bytes(slow_image)
    before = images_run(slow_server)
    done = client_cli("--url", slow_server.url, "--key", key, "--timeout", "0.3", "--max-attempts", "10",
                      "classify", str(photo))
    assert done.returncode == 0, done.stderr
    assert hits(slow_server.database_url, key) == 1
    assert images_run(slow_server) - before == 1
    rows = log_rows(slow_server.database_url, "key_id = :id", id=key_id(slow_server.database_url, key))
    assert rows[0]["status_code"] == 200 and not rows[0]["replayed"]  # finished though its client had gone
    assert rows[-1]["status_code"] == 200 and rows[-1]["replayed"]


def test_the_client_sends_a_fresh_key_per_call_or_the_one_given(server, key):
    pixel = base64.b64decode(ONE_PIXEL)
    with Client(server.url, key) as client:
        client.classify(pixel)
        client.classify(pixel)  # a new call: a new key, processed and charged again
        first = client.classify(pixel, idempotency_key="mine")
        again = client.classify(pixel, idempotency_key="mine")
        client.embeddings(pixel, idempotency_key="vectors")
        client.embeddings(pixel, idempotency_key="vectors")
    assert (again.id, again.predictions) == (first.id, first.predictions)  # the same answer
    assert hits(server.database_url, key) == 4
    assert replayed_flags(server.database_url, key) == [False, False, False, True, False, True]


def simultaneous(servers: list[Server], key: str, count: int) -> list[httpx.Response]:
    """`count` identical keyed requests at once, dealt in turn to the servers, each on its own connection."""
    async def send_all() -> list[httpx.Response]:
        clients = [httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     limits=httpx.Limits(max_keepalive_connections=0)) for s in servers]
        try:
            return await asyncio.gather(*[clients[i % len(clients)].post(
                "/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("burst")) for i in range(count)])
        finally:
            for client in clients:
                await client.aclose()

    return asyncio.run(send_all())


@pytest.mark.parametrize("layout", ["one process", "one process, Redis limiter", "two workers",
                                    "two hosts on PostgreSQL"])
def test_simultaneous_duplicates_are_charged_and_run_once(layout, request, start_server, tmp_path):
    backend = {"one process, Redis limiter": "sqlite+redis", "two hosts on PostgreSQL": "postgresql"}.get(layout, "sqlite")
    env = backend_env(request, backend, tmp_path)
    servers = [start_server(env, workers=2 if layout == "two workers" else 1)]
    if layout == "two hosts on PostgreSQL":
        servers.append(start_server(env))
    key = make_key(servers[0].database_url, rate_limit=10)
    before = images_run(*servers)
    responses = simultaneous(servers, key, 4)
    processed = [r for r in responses if r.status_code == 200 and "Idempotent-Replayed" not in r.headers]
    assert len(processed) == 1, [(r.status_code, r.headers.get("Idempotent-Replayed")) for r in responses]
    for response in responses:
        assert response.status_code == 409 or response.content == processed[0].content
    assert images_run(*servers) - before == 1
    with servers[0].client(key) as client:
        assert client.get("/v1/usage").json()["remaining"] == 9
    assert query(servers[0].database_url, "SELECT COUNT(*) AS n FROM idempotency_keys")[0]["n"] == 1


def test_a_stored_answer_outlives_a_restart(start_server):
    running = start_server()
    key = make_key(running.database_url)
    with running.client(key) as client:
        first = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("durable"))
    running.stop()
    running.start()
    with running.client(key) as client:
        again = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("durable"))
    assert again.headers["Idempotent-Replayed"] == "true" and again.content == first.content


def test_expired_keys_are_pruned_in_batches_and_then_processed_again(start_server):
    running = start_server({"IDEMPOTENCY_TTL_S": "1"})
    key = make_key(running.database_url)
    owner = key_id(running.database_url, key)
    for start in range(0, 1200, 400):  # more than one batch of expired rows
        values = ", ".join(f"({owner}, 'old-{n}', 'h', 'o', 200, '{{}}', 0, 0)" for n in range(start, start + 400))
        query(running.database_url, "INSERT INTO idempotency_keys (key_id, idempotency_key, request_hash, owner, "
                                    f"status_code, response_headers, created_at_ms, expires_at_ms) VALUES {values}")
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("brief")).status_code == 200
        deadline = time.monotonic() + 30
        while query(running.database_url, "SELECT COUNT(*) AS n FROM idempotency_keys")[0]["n"] > 0:
            assert time.monotonic() < deadline, "expired idempotency keys were not pruned"
            time.sleep(0.5)
        again = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("brief"))
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert hits(running.database_url, key) == 2


def claims(database_url: str) -> int:
    return query(database_url, "SELECT COUNT(*) AS n FROM idempotency_keys")[0]["n"]


def wait_for_no_claims(database_url: str) -> None:
    """Releases are handed to the database thread without waiting for them."""
    deadline = time.monotonic() + 10
    while claims(database_url) > 0:
        assert time.monotonic() < deadline, "the claim was not released"
        time.sleep(0.1)


def test_an_answer_that_cannot_be_stored_is_not_sent_and_leaves_the_key_free(start_server):
    running = start_server()
    key = make_key(running.database_url)
    query(running.database_url, "CREATE TRIGGER refuse_answers BEFORE UPDATE ON idempotency_keys "
                                "BEGIN SELECT RAISE(ABORT, 'answers refused'); END")
    with running.client(key) as client:
        failed = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("unstored"))
        # Its log row and its answer are one write: neither was committed, so the 200 was not sent either.
        assert_error(failed, 500, "internal_error")
        assert log_rows(running.database_url, "key_id = :id AND status_code = 200",
                        id=key_id(running.database_url, key)) == []
        wait_for_no_claims(running.database_url)
        query(running.database_url, "DROP TRIGGER refuse_answers")
        retried = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("unstored"))
    assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers


def test_a_stored_answer_pruned_between_the_repeats_insert_and_its_read_is_claimed_anew(request, start_server,
                                                                                      tmp_path):
    """On PostgreSQL INSERT ... ON CONFLICT DO NOTHING locks nothing: another host's prune can delete the row it
    met. A statement trigger does that prune at exactly that moment."""
    running = start_server(backend_env(request, "postgresql", tmp_path))
    key = make_key(running.database_url)
    with running.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("pruned")).status_code == 200
        query(running.database_url, "CREATE FUNCTION prune_answers() RETURNS trigger LANGUAGE plpgsql AS "
                                    "'BEGIN DELETE FROM idempotency_keys WHERE status_code IS NOT NULL; "
                                    "RETURN NULL; END'")
        query(running.database_url, "CREATE TRIGGER prune_after_insert AFTER INSERT ON idempotency_keys "
                                    "FOR EACH STATEMENT EXECUTE FUNCTION prune_answers()")
        again = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("pruned"))
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert hits(running.database_url, key) == 2


def test_an_answer_over_idempotency_max_stored_bytes_is_sent_but_not_stored(start_server):
    running = start_server({"IDEMPOTENCY_MAX_STORED_BYTES": "100"})
    key = make_key(running.database_url)
    with running.client(key) as client:
        first = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("large"))
        assert first.status_code == 200 and len(first.content) > 100
        wait_for_no_claims(running.database_url)
        again = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("large"))
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert hits(running.database_url, key) == 2


def test_a_replay_is_logged_with_the_stored_model_version_and_sends_only_the_stored_headers_that_describe_it(
        server, api, key):
    first = api.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("versioned"))
    query(server.database_url, "UPDATE idempotency_keys SET model_version = 'answered-by-v0', "
                               "response_headers = :headers WHERE key_id = :id",
          headers=json.dumps({"content-type": "application/json", "x-ratelimit-remaining": "7"}),
          id=key_id(server.database_url, key))
    again = api.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("versioned"))
    assert again.headers["Idempotent-Replayed"] == "true" and "X-RateLimit-Remaining" not in again.headers
    rows = log_rows(server.database_url, "key_id = :id", id=key_id(server.database_url, key))
    assert [row["model_version"] for row in rows] == [first.json()["model_version"], "answered-by-v0"]


def test_a_throttled_client_with_a_new_idempotency_key_is_refused_before_its_body_is_read(server):
    key = make_key(server.database_url, rate_limit=1, window_s=60)
    with server.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}, headers=keyed("stored")).status_code == 200
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 429
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nIdempotency-Key: new\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n").encode()
    status, _, _ = raw_http(server.port, head, timeout=10)  # no body byte sent: the server must not wait for them
    assert status == 429


def test_the_client_sends_an_empty_idempotency_key_as_given(server, key):
    with Client(server.url, key) as client, pytest.raises(InvalidRequest) as refused:
        client.classify(base64.b64decode(ONE_PIXEL), idempotency_key="")
    assert "Idempotency-Key" in str(refused.value)
