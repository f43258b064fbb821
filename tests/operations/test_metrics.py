"""GET /metrics: Prometheus' text format, numbers that move with traffic, right under `--workers 2`."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from conftest import ONE_PIXEL, assert_error, b64, make_key, photo_path, scrape, value, workers_of


def test_metrics_count_requests_by_route_and_status_and_time_them(server):
    key = make_key(server.database_url)
    before = scrape(server.url)
    with server.client(key) as client:
        for _ in range(3):
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.get("/v1/usage").status_code == 200
        assert client.get("/no/such/page-123").status_code == 404
    with server.client() as anonymous:
        assert anonymous.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 401
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("http_requests_total", route="/v1/classify", status="200") == 3
    assert delta("http_requests_total", route="/v1/classify", status="401") == 1
    assert delta("http_requests_total", route="/v1/usage", status="200") == 1
    assert delta("http_requests_total", route="unmatched", status="404") == 1  # a fixed label, not the path
    assert not any("page-123" in str(labels) for _, labels in after)
    assert delta("http_request_duration_seconds_count", route="/v1/classify") == 4
    buckets = {dict(labels)["le"] for name, labels in after
               if name == "http_request_duration_seconds_bucket" and dict(labels)["route"] == "/v1/classify"}
    assert len(buckets) > 5 and "+Inf" in buckets
    assert delta("http_request_duration_seconds_bucket", route="/v1/classify", le="+Inf") == 4
    assert delta("inference_seconds_count") == 3 and delta("inference_seconds_sum") > 0
    assert delta("inference_batch_size_count") == 3 and delta("inference_batch_size_sum") == 3  # one at a time
    assert value(after, "inference_queue_depth") == 0
    assert delta("auth_failures_total", code="missing_api_key") == 1


def test_metrics_count_rate_limit_refusals_and_name_the_model(server):
    key = make_key(server.database_url, rate_limit=1)
    before = scrape(server.url)
    with server.client(key) as client:
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
        assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 429
        model = client.get("/v1/models").json()["data"][0]
    after = scrape(server.url)
    assert value(after, "rate_limit_rejections_total") - value(before, "rate_limit_rejections_total") == 1
    assert value(after, "model_info", model=model["id"], version=model["version"], backend=model["backend"],
                 precision=model["precision"], weights_source=model["weights_source"]) == 1


def test_metrics_can_be_turned_off(start_server):
    running = start_server({"METRICS_ENABLED": "false"})
    with running.client() as client:
        assert_error(client.get("/metrics"), 404, "not_found")
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_two_workers_report_the_sum_of_both_and_clean_up_after_dead_servers(start_server):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.gettempdir()) / f"classify-metrics-{dead.pid}"  # a server that died without cleaning up
    stale.mkdir(exist_ok=True)
    (stale / "counter_1.db").write_bytes(b"left over")
    running = start_server(workers=2)
    key = make_key(running.database_url)
    for _ in range(10):  # a new connection each, so both workers take some
        with running.client(key) as client:
            assert client.post("/v1/classify", json={"image": ONE_PIXEL}).status_code == 200
    for _ in range(6):  # whichever worker answers the scrape, it reports both
        samples = scrape(running.url)
        assert value(samples, "http_requests_total", route="/v1/classify", status="200") == 10
        assert value(samples, "inference_batch_size_count") == 10
    assert not stale.exists()
    directory = Path(tempfile.gettempdir()) / f"classify-metrics-{running.process.pid}"
    writers = {path.stem.rsplit("_", 1)[1] for path in directory.glob("counter_*.db")}
    assert len(writers) == 2, writers  # both workers keep their numbers there


def queue_depth_of(directory: Path, pid: int) -> float:
    """The inference_queue_depth one worker wrote to its file."""
    files = [str(path) for path in directory.glob(f"gauge_livesum_{pid}.db")]
    return sum(sample.value for metric in MultiProcessCollector.merge(files) for sample in metric.samples
               if sample.name == "inference_queue_depth")


@pytest.fixture(scope="module")
def cat() -> str:
    return b64(photo_path("chelsea.png").read_bytes())


def test_a_killed_workers_queue_leaves_the_sum_once_its_replacement_starts(start_server, cat):
    """Only a clean stop marked a worker dead: after `kill -9` of a worker with images queued, the idle server
    reported them on every scrape, for good."""
    running = start_server({"MAX_BATCH": "1"}, workers=2)
    key = make_key(running.database_url, rate_limit=100_000)
    directory = Path(tempfile.gettempdir()) / f"classify-metrics-{running.process.pid}"
    workers = set(workers_of(running.process.pid))
    assert len(workers) == 2

    def post() -> int:
        try:
            with running.client(key) as client:
                return client.post("/v1/classify", json={"images": [cat] * 8}).status_code
        except httpx.TransportError:
            return 0  # its worker was killed

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        posted = [pool.submit(post) for _ in range(8)]
        deadline = time.monotonic() + 60
        while not (queued := {pid: depth for pid in workers if (depth := queue_depth_of(directory, pid)) > 0}):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim = next(iter(queued))
        os.kill(victim, signal.SIGKILL)
        statuses = [future.result() for future in posted]
    assert 0 in statuses, statuses  # (the kernel may have given every connection to the killed worker)
    deadline = time.monotonic() + 120
    while len(replacements := set(workers_of(running.process.pid)) - workers) < 1:  # uvicorn starts another worker
        assert time.monotonic() < deadline
        time.sleep(0.2)
    running.wait_ready()
    time.sleep(2)  # readiness came from either worker: give the new one its start-up
    for _ in range(8):  # idle now, whichever worker answers the scrape
        assert value(scrape(running.url), "inference_queue_depth") == 0
    assert not list(directory.glob(f"gauge_livesum_{victim}.db"))
