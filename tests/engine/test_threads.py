"""The server's threads: named, so `top -H` and /proc/PID/task/*/comm tell them apart; each worker's model sized
to its share of the cores (WEB_CONCURRENCY), not all of them; batches side by side on threads of their own
(PARALLEL_BATCHES); and the model's threads idle between batches."""

import os
import subprocess
import time
from pathlib import Path

import numpy as np
from test_batching import post_all

from conftest import ROOT, b64, make_key, photo_path, server_env, thread_names, workers_of
from engine.graph_cache import find_cached
from engine.photos import photo_inputs
from engine.runtimes import OnnxBackend
from engine.weights import locate_weights
from settings import Settings, usable_cores

REQUESTS = 40


def test_the_decoders_the_model_and_its_pool_are_named(server, api):
    cat = b64(photo_path("chelsea.png").read_bytes())
    assert api.post("/v1/classify", json={"images": [cat] * usable_cores()}).status_code == 200  # a decoder each
    names = thread_names(server.process.pid)
    assert sorted(name for name in names if name.startswith("decode_")) == [f"decode_{i}" for i in range(usable_cores())]
    assert names.count("model") == usable_cores()  # by default a pass per core, each on its one thread


def test_each_worker_takes_its_share_of_the_cores(server, start_server):
    """One process runs its forward passes on every core; each of two workers on half of them, a pass per core."""
    two = start_server(workers=2)
    deadline = time.monotonic() + 60  # /readyz answers once one worker is ready; the other may still be loading
    while two.log().count("ready: ") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = workers_of(two.process.pid)
    assert len(workers) == 2
    share = max(1, usable_cores() // 2)
    assert two.log().count(f", {share} threads, {share} at once, batches of up to") == 2  # a pass per thread
    for pid in workers:
        assert thread_names(pid).count("model") == share


def make_run(*args: str) -> str:
    # --no-print-directory: under `make test` this make is a sub-make, which would print "Leaving directory" last
    return subprocess.run(["make", "--no-print-directory", "-n", "run", *args], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.splitlines()[-1]


def test_make_run_serves_the_fast_layout_unless_told_the_worker_count():
    """`make run` is `python main.py`, which picks the workers (tests/edge/test_fast_layout.py); WORKERS=3 is passed
    as WEB_CONCURRENCY, which uvicorn and each worker read."""
    assert make_run().endswith("/python main.py --host 127.0.0.1 --port 8000") and "WEB_CONCURRENCY" not in make_run()
    command = make_run("WORKERS=3")
    assert command.startswith("WEB_CONCURRENCY=3 ") and "python main.py" in command and "--workers" not in command


def threads_cpu_s(pid: int, names: tuple[str, ...]) -> dict[int, float]:
    """utime + stime of each of the process's threads of these names, in seconds, by thread id."""
    spent = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() in names:
                ticks = sum(int(field) for field in (task / "stat").read_text().rsplit(")", 1)[1].split()[11:13])
                spent[int(task.name)] = ticks / os.sysconf("SC_CLK_TCK")
        except OSError:  # a thread that has just ended
            pass
    return spent


def test_parallel_batches_each_run_on_a_model_thread_of_their_own(start_server):
    """PARALLEL_BATCHES=2 on 2 threads: two model threads, each a pass's only thread, both computing when
    single-image batches (MAX_BATCH=1) come faster than one thread runs them; every answer is the one the image
    gets alone."""
    server = start_server({"PARALLEL_BATCHES": "2", "INFERENCE_THREADS": "2", "MAX_BATCH": "1"})
    assert thread_names(server.process.pid).count("model") == 2
    assert ", 2 threads, 2 at once, batches of up to 1," in server.log()
    key = make_key(server.database_url, rate_limit=1000)
    cat = b64(photo_path("chelsea.png").read_bytes())
    with server.client(key) as client:
        alone = client.post("/v1/classify", json={"image": cat}).json()["predictions"]
        before = threads_cpu_s(server.process.pid, ("model",))
        responses = post_all(server.url, key, [{"images": [cat] * 8}] * 4)
    spent = [cpu - before[thread] for thread, cpu in threads_cpu_s(server.process.pid, ("model",)).items()]
    assert len(spent) == 2 and min(spent) > 0.05, spent  # 32 passes of about 10 ms of CPU each, shared
    for response in responses:
        assert response.status_code == 200
        for result in response.json()["results"]:
            assert result["batch_size"] == 1
            assert [p["label"] for p in result["predictions"]] == [p["label"] for p in alone]
            assert np.allclose([p["confidence"] for p in result["predictions"]],
                               [p["confidence"] for p in alone], atol=1e-5)


def test_between_requests_the_models_threads_rest(server, api):
    """A forward pass costs the server what it costs ONNX Runtime alone, back to back: its pool does not spin
    between batches (spinning, it cost 1.5x to 2x that with 20 ms between requests)."""
    cat = b64(photo_path("chelsea.png").read_bytes())
    settings = Settings(**{name.lower(): value for name, value in server_env(server.tmp).items()})
    model, files = find_cached(locate_weights(settings), settings)  # the server's own graph
    [x] = photo_inputs(model.spec, [photo_path("chelsea.png")])
    alone = OnnxBackend(files.fp32, "fp32", settings.threads_per_batch)  # a pass on the threads it has in the server
    for _ in range(3):
        alone.run(x[None])
        api.post("/v1/classify", json={"image": cat})
    started = time.process_time()
    for _ in range(REQUESTS):
        alone.run(x[None])
    raw_s = (time.process_time() - started) / REQUESTS
    before = sum(threads_cpu_s(server.process.pid, ("model", "model_pool")).values())
    for _ in range(REQUESTS):
        assert api.post("/v1/classify", json={"image": cat}).json()["batch_size"] == 1
        time.sleep(0.02)
    served_s = (sum(threads_cpu_s(server.process.pid, ("model", "model_pool")).values()) - before) / REQUESTS
    assert served_s < 1.35 * raw_s, (served_s, raw_s)  # CPU time, not wall time: the noise of a shared machine is in both
