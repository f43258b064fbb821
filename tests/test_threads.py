"""The server's threads: named, so `top -H` and /proc/PID/task/*/comm tell them apart; each worker's model sized
to its share of the cores (WEB_CONCURRENCY), not all of them; and the model's threads idle between batches."""

import os
import subprocess
import time
from pathlib import Path

from backends import OnnxBackend, photo_inputs
from conftest import ROOT, Server, b64, photo_path, server_env
from graph_cache import find_cached
from settings import Settings, usable_cores
from weights import locate_weights

REQUESTS = 40


def thread_names(pid: int) -> list[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that has just ended
            pass
    return names


def workers_of(server: Server) -> list[int]:
    """uvicorn's workers: the supervisor's children that multiprocessing spawned (not its resource tracker)."""
    assert server.process is not None
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_the_decoders_the_model_and_its_pool_are_named(server, api):
    cat = b64(photo_path("chelsea.png").read_bytes())
    assert api.post("/v1/classify", json={"images": [cat] * usable_cores()}).status_code == 200  # a decoder each
    names = thread_names(server.process.pid)
    assert sorted(name for name in names if name.startswith("decode_")) == [f"decode_{i}" for i in range(usable_cores())]
    assert names.count("model") == 1
    assert names.count("model_pool") >= usable_cores() - 1  # ONNX Runtime's: a thread per core after the model's


def test_each_worker_takes_its_share_of_the_cores(server, start_server):
    """One process runs its forward passes on every core; each of two workers on half of them."""
    two = start_server(workers=2)
    deadline = time.monotonic() + 60  # /readyz answers once one worker is ready; the other may still be loading
    while two.log().count("ready: ") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = workers_of(two)
    assert len(workers) == 2
    share = max(1, usable_cores() // 2)
    assert two.log().count(f", {share} threads, batches of up to") == 2
    for pid in workers:
        # ONNX Runtime's pool: a thread per core after the model's (torch's, had a worker exported the graph,
        # would add more: the `server` fixture has cached it)
        assert thread_names(pid).count("model_pool") == share - 1


def test_make_run_passes_the_worker_count_to_uvicorn_and_the_app():
    # --no-print-directory: under `make test` this make is a sub-make, which would print "Leaving directory" last
    command = subprocess.run(["make", "--no-print-directory", "-n", "run", "WORKERS=3"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert command.startswith("WEB_CONCURRENCY=3 ") and "uvicorn main:app" in command and "--workers" not in command


def thread_cpu_s(pid: int, names: tuple[str, ...]) -> float:
    """utime + stime of the process's threads of these names, in seconds."""
    ticks = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() in names:
                ticks += sum(int(field) for field in (task / "stat").read_text().rsplit(")", 1)[1].split()[11:13])
        except OSError:  # a thread that has just ended
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def test_between_requests_the_models_threads_rest(server, api):
    """A forward pass costs the server what it costs ONNX Runtime alone, back to back: its pool does not spin
    between batches (spinning, it cost 1.5x to 2x that with 20 ms between requests)."""
    cat = b64(photo_path("chelsea.png").read_bytes())
    settings = Settings(**{name.lower(): value for name, value in server_env(server.tmp).items()})
    model, files = find_cached(locate_weights(settings), settings)  # the server's own graph
    [x] = photo_inputs(model.spec, [photo_path("chelsea.png")])
    alone = OnnxBackend(files.fp32, "fp32", usable_cores())
    for _ in range(3):
        alone.run(x[None])
        api.post("/v1/classify", json={"image": cat})
    started = time.process_time()
    for _ in range(REQUESTS):
        alone.run(x[None])
    raw_s = (time.process_time() - started) / REQUESTS
    before = thread_cpu_s(server.process.pid, ("model", "model_pool"))
    for _ in range(REQUESTS):
        assert api.post("/v1/classify", json={"image": cat}).json()["batch_size"] == 1
        time.sleep(0.02)
    served_s = (thread_cpu_s(server.process.pid, ("model", "model_pool")) - before) / REQUESTS
    assert served_s < 1.35 * raw_s, (served_s, raw_s)  # CPU time, not wall time: the noise of a shared machine is in both
