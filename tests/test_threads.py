"""The server's threads: named, so `top -H` and /proc/PID/task/*/comm tell them apart, and each worker's model
sized to its share of the cores (WEB_CONCURRENCY), not all of them."""

import subprocess
from pathlib import Path

from conftest import ROOT, Server, b64, photo_path
from settings import usable_cores


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
    alone = thread_names(server.process.pid).count("model_pool")
    two = start_server(workers=2)
    workers = workers_of(two)
    assert len(workers) == 2
    share = max(1, usable_cores() // 2)
    assert two.log().count(f", {share} threads, batches of up to") == 2
    for pid in workers:
        assert thread_names(pid).count("model_pool") == alone - (usable_cores() - share)


def test_make_run_passes_the_worker_count_to_uvicorn_and_the_app():
    command = subprocess.run(["make", "-n", "run", "WORKERS=3"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()[-1]
    assert command.startswith("WEB_CONCURRENCY=3 ") and "uvicorn main:app" in command and "--workers" not in command
