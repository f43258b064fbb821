"""The client (client/) against a real server: the library (sync and async), its retries, and its command line."""

import asyncio
import email.utils
import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from client import (AsyncClient, AuthenticationError, ByStatus, Classification, Client, ClientError, InvalidRequest,
                    Latency, ModelInfo, MultiClassification, RateLimited, Retries, ServerUnreachable, TimedOut, Usage,
                    UsageBucket)
from client.client import next_wait_s
from conftest import CAT_LABELS, ROOT, client_cli, free_port, key_id, log_rows, make_key, photo_path

FAST = Retries(max_attempts=3, backoff_s=0.01)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A cat, a cup whose name says nothing, a broken PNG, and a text file posing as a PNG."""
    folder = tmp_path / "photos"
    (folder / "kitchen").mkdir(parents=True)
    (folder / "cat.png").write_bytes(photo_path("chelsea.png").read_bytes())
    (folder / "kitchen" / "cup").write_bytes(photo_path("coffee.png").read_bytes())
    (folder / "broken.png").write_bytes(photo_path("chelsea.png").read_bytes()[:3000])
    (folder / "notes.png").write_text("not a picture at all")
    return folder


def test_classify_a_path_or_bytes_with_typed_results(server, key, cat_png):
    with Client(server.url, key) as client:
        from_path = client.classify(photo_path("chelsea.png"), top_k=3)
        from_bytes = client.classify(cat_png)
        usage = client.usage()
        client.embeddings(cat_png, cat_png)
        embeddings_usage = client.usage(endpoint="embeddings")
    assert (embeddings_usage.endpoint, embeddings_usage.total_requests, embeddings_usage.images) == ("embeddings", 1, 2)
    assert usage.endpoint == "classify"
    assert isinstance(from_path, Classification) and len(from_path.predictions) == 3
    assert from_path.predictions[0].label in CAT_LABELS and from_path.model == "efficientnet_lite0"
    assert [p.label for p in from_bytes.predictions[:3]] == [p.label for p in from_path.predictions]
    assert from_bytes.rate_limit is not None and from_bytes.rate_limit.limit == 100_000
    assert isinstance(usage, Usage) and usage.total_requests == 2 and usage.successful_requests == 2


def test_several_images_in_one_request_the_models_and_usage_over_time(server, key, cat_png):
    with Client(server.url, key) as client:
        before = time.time()
        several = client.classify_many([photo_path("coffee.png"), cat_png], top_k=2)
        models = client.models()
        usage = client.usage(start_time=before - 120, bucket_width="1m")
        earlier = client.usage(start_time=before - 7200, end_time=before - 3600)
    assert isinstance(several, MultiClassification) and several.model == "efficientnet_lite0"
    assert [len(result.predictions) for result in several.results] == [2, 2]
    assert several.results[0].predictions[0].label == "espresso" and several.results[1].predictions[0].label in CAT_LABELS
    assert several.rate_limit is not None and several.rate_limit.remaining == 100_000 - 2  # one per image
    assert [(m.id, m.labels, m.weights_source) for m in models] == [("efficientnet_lite0", 1000, "fallback package")]
    assert isinstance(models[0], ModelInfo)
    assert usage.total_requests == 1 and usage.bucket_width == "1m" and usage.start_time == int(before - 120) // 60 * 60
    assert usage.images == 2 and usage.by_status == ByStatus(succeeded=1, client_errors=0, rate_limited=0,
                                                             server_errors=0)
    assert isinstance(usage.latency_ms, Latency) and 0 < usage.latency_ms.p50 <= usage.latency_ms.p99
    assert sum(bucket.images for bucket in usage.buckets) == 2
    assert usage.buckets and all(isinstance(bucket, UsageBucket) for bucket in usage.buckets)
    assert sum(bucket.total_requests for bucket in usage.buckets) == 1
    assert earlier.total_requests == 0 and earlier.buckets is None


def test_the_async_client_sends_several_images_and_reads_the_models(server, key, cat_png):
    async def calls() -> tuple[MultiClassification, list[ModelInfo], Usage]:
        async with AsyncClient(server.url, key) as client:
            several = await client.classify_many([cat_png, photo_path("coffee.png")])
            return several, await client.models(), await client.usage(start_time=time.time() - 60, bucket_width="1m")

    several, models, usage = asyncio.run(calls())
    assert [result.predictions[0].label for result in several.results][1] == "espresso"
    assert models[0].backend in {"onnxruntime", "torch"} and usage.buckets is not None


def test_a_bare_host_and_port_is_taken_as_http(server, key):
    bare = server.url.removeprefix("http://")  # 127.0.0.1:PORT, as curl takes it
    with Client(bare, key) as client:
        assert client.usage().limit == 100_000
    done = client_cli("--url", bare.replace("127.0.0.1", "localhost"), "--key", key, "usage")
    assert done.returncode == 0 and "Limit: 100000 requests" in done.stdout, done.stderr


def test_a_timeout_is_reported_as_a_timeout_not_as_a_server_down(key):
    # A server that takes connections and never answers: however fast the machine, the answer never comes.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with Client(url, key, timeout=0.2, retries=Retries(max_attempts=1)) as client:
            with pytest.raises(TimedOut, match=r"No answer from .* within 0.2 s .*1 attempt\)"):
                client.usage()
        done = client_cli("--url", url, "--key", key, "--timeout", "0.2", "--max-attempts", "2", "usage")
    assert done.returncode == 3, done.stderr
    assert f"No answer from {url} within 0.2 s" in done.stderr and "2 attempts" in done.stderr
    assert "Is the server running" not in done.stderr and "Cannot reach" not in done.stderr


def test_the_async_client_answers_the_same_concurrently(server, key):
    async def both() -> list[Classification]:
        async with AsyncClient(server.url, key) as client:
            return await asyncio.gather(client.classify(photo_path("chelsea.png")), client.classify(photo_path("coffee.png")))

    cat, cup = asyncio.run(both())
    assert cat.predictions[0].label in CAT_LABELS and cup.predictions[0].label == "espresso"


def test_url_and_key_come_from_the_environment(server, key, monkeypatch):
    monkeypatch.setenv("CLASSIFY_URL", server.url)
    monkeypatch.setenv("CLASSIFY_API_KEY", key)
    with Client() as client:
        assert client.usage().limit == 100_000
    monkeypatch.delenv("CLASSIFY_API_KEY")
    with pytest.raises(ClientError, match="CLASSIFY_API_KEY"):
        Client(server.url)


def test_a_client_mistake_is_raised_at_once_not_retried(server, key):
    with Client(server.url, key) as client, pytest.raises(InvalidRequest) as caught:
        client.classify(b"not an image")
    assert (caught.value.status_code, caught.value.code) == (400, "not_an_image")
    assert len(log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))) == 1
    with Client(server.url, "sk-" + "Q" * 43) as client, pytest.raises(AuthenticationError) as refused:
        client.usage()
    assert refused.value.code == "invalid_api_key"


def test_a_used_up_key_waits_out_429s_then_gives_up_after_max_attempts(server, cat_png):
    key = make_key(server.database_url, rate_limit=1, window_s=2)
    with Client(server.url, key) as client:
        client.classify(cat_png)
        client.classify(cat_png)  # a 429 first, then admitted after Retry-After
        assert [row["status_code"] for row in log_rows(server.database_url, "key_id = :key_id",
                                                        key_id=key_id(server.database_url, key))] == [200, 429, 200]
    slow = make_key(server.database_url, rate_limit=1, window_s=3600)
    with Client(server.url, slow, retries=Retries(max_attempts=3)) as client:
        client.classify(cat_png)
        with pytest.raises(RateLimited) as caught:
            client.classify(cat_png)  # an hour's wait is over max_retry_after_s: raised, not slept
    assert caught.value.retry_after_s > 3000


def test_no_server_is_retried_then_reported_clearly():
    with Client(f"http://127.0.0.1:{free_port()}", "sk-x", retries=FAST) as client:
        with pytest.raises(ServerUnreachable, match=r"Cannot reach .*3 attempts.*Is the server running"):
            client.usage()
    with Client(f"http://127.0.0.1:{free_port()}", "sk-x", retries=Retries(max_attempts=1)) as client:
        with pytest.raises(ServerUnreachable, match=r"; 1 attempt\)"):
            client.usage()


def response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize("outcome, expected", [
    (response(429, **{"Retry-After": "7"}), 7.0),
    (response(503, **{"Retry-After": "2"}), 2.0),
    (response(409, **{"Retry-After": "1"}), 1.0),  # the same Idempotency-Key's first request still runs
    (response(503), 1.0),  # no Retry-After: backoff; at attempt 3, half of 0.5 * 2**2 with no jitter
    (response(502), 1.0),
    (response(504), 1.0),
    (httpx.ConnectError("refused"), 1.0),
    (httpx.ReadTimeout("slow"), 1.0),
    (response(429, **{"Retry-After": "3600"}), None),  # longer than max_retry_after_s: give up and raise
    (response(400), None), (response(401), None), (response(404), None), (response(422), None),
    (response(500), None),  # a bug on the server: trying again gives the same
    (response(200), None),
    (httpx.UnsupportedProtocol("ftp://"), None),
])
def test_what_is_retried_and_after_how_long(outcome, expected):
    assert next_wait_s(Retries(), 3, outcome, jitter=0.0) == expected


def test_retry_after_may_be_an_http_date():
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 < next_wait_s(Retries(), 1, response(429, **{"Retry-After": in_a_minute}), jitter=0.0) <= 60


def test_backoff_grows_with_jitter_and_attempts_are_bounded():
    retries = Retries(max_attempts=6, backoff_s=1, max_backoff_s=5)
    lowest = [next_wait_s(retries, attempt, httpx.ConnectError("x"), jitter=0.0) for attempt in range(1, 7)]
    highest = [next_wait_s(retries, attempt, httpx.ConnectError("x"), jitter=0.999999) for attempt in range(1, 7)]
    assert lowest == [0.5, 1, 2, 2.5, 2.5, None]  # half of min(5, 2**(n-1)), then no 6th wait: attempts are spent
    assert [round(w, 3) for w in highest[:5]] == [1, 2, 4, 5, 5]


def test_the_command_line_classifies_a_folder_within_a_tiny_limit(server, photos):
    """Three images (one broken) on a key that admits one request per 3 s: the 429s are waited out, every file
    gets its line, the broken one with the server's message, and the exit code says one failed."""
    key = make_key(server.database_url, rate_limit=1, window_s=3)
    done = client_cli("--url", server.url, "--key", key, "classify", str(photos), "--concurrency", "3")
    assert done.returncode == 1, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert set(lines) == {str(photos / "cat.png"), str(photos / "kitchen" / "cup"), str(photos / "broken.png")}
    assert lines[str(photos / "cat.png")].split(" ")[0] in {label.split(" ")[0] for label in CAT_LABELS}
    assert lines[str(photos / "kitchen" / "cup")].startswith("espresso ")
    assert lines[str(photos / "broken.png")].startswith("FAILED 400 corrupt_image: ")
    assert f"skipped {photos / 'notes.png'}: not an image (by its content)" in done.stderr.splitlines()
    assert done.stderr.splitlines()[-1] == "4 files: 2 classified, 1 failed, 1 skipped."
    statuses = [row["status_code"] for row in log_rows(server.database_url, "key_id = :key_id AND endpoint = '/v1/classify'",
                                                        key_id=key_id(server.database_url, key))]
    assert 429 in statuses and statuses.count(200) == 2 and statuses.count(400) == 1
    assert "\r[" not in done.stderr  # piped: no progress bar


def test_the_command_line_prints_json_lines_and_a_bar_on_a_terminal(server, key, photos):
    leader, follower = pty.openpty()
    try:
        done = client_cli("--url", server.url, "--key", key, "classify", str(photos / "cat.png"),
                          str(photos / "kitchen"), "--json", "--top-k", "2", stderr=follower)
        os.close(follower)
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal is closed once everything is read
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(Path(r["path"]).name for r in results) == ["cat.png", "cup"]
    assert all(r["ok"] and len(r["predictions"]) == 2 and r["model"] == "efficientnet_lite0" for r in results)
    assert b"\r[" in terminal and b"] 2/2" in terminal


def test_the_command_line_counts_one_file_in_the_singular(server, key):
    done = client_cli("--url", server.url, "--key", key, "classify", str(photo_path("coffee.png")))
    assert done.returncode == 0 and done.stderr.strip() == "1 file: 1 classified, 0 failed, 0 skipped.", done.stderr


def test_the_command_line_names_every_file_it_skips(server, key, photos):
    """Before, a folder's other files were only counted ("Skipped 2 files that are not images"): a user with
    hundreds of files could not find them."""
    (photos / "kitchen" / "recipe.txt").write_text("two eggs")
    (photos / "gone.png").symlink_to(photos / "nowhere.png")
    skipped = {photos / "notes.png": "not an image", photos / "kitchen" / "recipe.txt": "not an image",
               photos / "gone.png": "not a file (a broken link, a pipe or a device)"}
    done = client_cli("--url", server.url, "--key", key, "classify", str(photos))
    assert done.returncode == 1, done.stderr  # broken.png
    lines = done.stderr.splitlines()
    for path, reason in skipped.items():
        by_content = " (by its content)" if reason == "not an image" else ""
        assert f"skipped {path}: {reason}{by_content}" in lines, lines
    assert lines[-1] == "6 files: 2 classified, 1 failed, 3 skipped."
    assert not any(str(path) in done.stdout for path in skipped)

    as_json = client_cli("--url", server.url, "--key", key, "classify", str(photos), "--json")
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [o for o in objects if "skipped" in o] == [{"path": str(path), "ok": False, "skipped": reason}
                                                      for path, reason in sorted(skipped.items())]
    assert sorted(Path(o["path"]).name for o in objects if "skipped" not in o) == ["broken.png", "cat.png", "cup"]
    assert as_json.stderr.splitlines()[-1] == "6 files: 2 classified, 1 failed, 3 skipped."


def test_the_command_line_shows_usage(server, key):
    text = client_cli("usage", CLASSIFY_URL=server.url, CLASSIFY_API_KEY=key)
    assert text.returncode == 0 and f"Key {key[:11]}...: 0 classify requests" in text.stdout
    assert "Limit: 100000 requests per 60 s" in text.stdout
    assert "Images: 0. Answers: 0 succeeded, 0 client errors, 0 rate limited, 0 server errors." in text.stdout
    # A new key has no older requests to have passed retention: it did say so, "Counted from <400 days ago> on".
    assert "Latency" not in text.stdout and "Counted from " not in text.stdout
    with Client(server.url, key) as client:
        client.classify_many([photo_path("coffee.png"), photo_path("coffee.png")])
        with pytest.raises(InvalidRequest):
            client.classify(b"not an image")
    text = client_cli("usage", CLASSIFY_URL=server.url, CLASSIFY_API_KEY=key)
    assert "Images: 3. Answers: 1 succeeded, 1 client errors, 0 rate limited, 0 server errors." in text.stdout
    assert re.search(r"Latency: p50 [\d.]+ ms, p95 [\d.]+ ms, p99 [\d.]+ ms\.", text.stdout), text.stdout
    as_json = json.loads(client_cli("usage", "--json", CLASSIFY_URL=server.url, CLASSIFY_API_KEY=key).stdout)
    assert as_json["key_prefix"] == key[:11] and as_json["remaining"] == 100_000 - 3
    assert as_json["by_status"]["succeeded"] == 1 and as_json["images"] == 3 and as_json["latency_ms"]["p99"] > 0


@pytest.mark.parametrize("args, code, words", [
    (["classify", "no/such/folder"], 2, "no such file or folder"),
    (["classify", "--top-k", "0", "x"], 2, "from 1 to 20"),
    (["--key", "sk-" + "Q" * 43, "usage"], 4, "refused the key"),
    (["--url", "http://127.0.0.1:1", "--max-attempts", "1", "usage"], 3, "Cannot reach http://127.0.0.1:1"),
])
def test_command_line_exit_codes(server, key, args, code, words):
    env = {"CLASSIFY_URL": server.url, "CLASSIFY_API_KEY": key}
    done = client_cli(*args, **env)
    assert done.returncode == code and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    no_key = client_cli("usage", CLASSIFY_URL=server.url)
    assert no_key.returncode == 2 and "CLASSIFY_API_KEY" in no_key.stderr


def test_a_server_stopped_mid_run_stops_the_run_with_a_clear_message(start_server, tmp_path):
    server = start_server()
    key = make_key(server.database_url, rate_limit=1, window_s=3)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(6):
        (folder / f"cup{i}.png").write_bytes(photo_path("coffee.png").read_bytes())
    run = subprocess.Popen([sys.executable, "-m", "client", "--url", server.url, "--key", key, "--max-attempts", "3",
                            "classify", str(folder)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout is not None and run.stderr is not None
    first = run.stdout.readline()  # one file done; the next is waiting out its 429
    server.stop()
    rest, errors = run.communicate(timeout=120)
    assert first.startswith(str(folder / "cup0.png") + ": espresso")
    assert run.returncode == 3, errors
    assert "Stopped: Cannot reach " + server.url in errors and "Is the server running?" in errors
    assert "not sent" in errors and "Traceback" not in errors
