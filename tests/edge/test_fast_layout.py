"""`python main.py` (what `make run` starts): `uvicorn main:app` with as many workers as serve most on the cores and
memory the process may use, counting its CPU affinity and its cgroup's CPU quota and memory limit (a container's
--cpus and --memory), not the host's; each worker runs a forward pass per core of its share."""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, b64, make_key, photo_path
from settings import fast_layout_workers, usable_cores

MAIN_PY = ("main.py",)
CGROUPS = Path("/sys/fs/cgroup")


@contextmanager
def cgroup(cpu_quota_cores: float | None = None, memory_bytes: int | None = None) -> Iterator[tuple[str, ...]]:
    """A real cgroup with these limits (v1's cpu and memory trees, or v2's one), as the command prefix that starts
    a process inside it; removed after the block. Skips the test where cgroups cannot be made (not root)."""
    name = f"classify-test-{uuid.uuid4().hex[:8]}"
    if (CGROUPS / "cpu").is_dir():  # v1
        limits = {CGROUPS / "cpu" / name: {"cpu.cfs_period_us": 100_000, "cpu.cfs_quota_us": cpu_quota_cores and int(cpu_quota_cores * 100_000)},
                  CGROUPS / "memory" / name: {"memory.limit_in_bytes": memory_bytes}}
    else:
        limits = {CGROUPS / name: {"cpu.max": cpu_quota_cores and f"{int(cpu_quota_cores * 100_000)} 100000",
                                   "memory.max": memory_bytes}}
    made = []
    try:
        for folder, files in limits.items():
            folder.mkdir()
            made.append(folder)
            for file, limit in files.items():
                if limit is not None:
                    (folder / file).write_text(str(limit))
    except OSError as exc:
        for folder in made:
            folder.rmdir()
        pytest.skip(f"cannot make a cgroup here: {exc}")
    joins = "; ".join(f"echo $$ > {folder}/cgroup.procs" for folder in made)
    try:
        yield ("sh", "-c", f'{joins}; exec "$@"', "sh")
    finally:
        for folder in made:
            for pid in (folder / "cgroup.procs").read_text().split():
                os.kill(int(pid), 9)
            folder.rmdir()


def test_python_main_py_serves_the_fast_layout(start_server):
    """No worker count given: a worker per usable core (as many as fit in the memory), each running its passes on
    one thread; and it answers as uvicorn main:app does."""
    server = start_server(launcher=MAIN_PY)
    workers, cores = fast_layout_workers(), usable_cores()
    share = max(1, cores // workers)
    assert f"python main.py: {workers} worker{'s' if workers > 1 else ''} on {cores} usable cores" in server.log()
    assert server.log().count(f", {share} threads, {share} at once, batches of up to 8,") >= 1
    key = make_key(server.database_url)
    with server.client(key) as client:
        answer = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "tiger cat"


def test_a_worker_count_given_is_the_one_served(start_server):
    """--workers=2 is given to uvicorn as WEB_CONCURRENCY, so each worker also knows its share: one core each."""
    server = start_server(launcher=MAIN_PY, args=("--workers=2",))
    assert "python main.py: 2 workers on " in server.log()
    share = max(1, usable_cores() // 2)
    ready_lines = [line for line in server.log().splitlines() if " ready: " in line]
    assert all(f", {share} threads, {share} at once," in line for line in ready_lines), ready_lines


def test_the_cgroup_limits_are_the_ones_counted():
    """A quota of 1.5 cores' time counts as 2 cores (rounded up, as Go and the JVM do), never more than the
    affinity gives; a 600 MiB memory limit is read as such, and leaves room for one worker (WORKER_MEMORY_BYTES),
    where the cores alone would have made two."""
    probe = ("import settings; print(settings.cpu_quota_cores(), settings.usable_cores(), "
             "settings.memory_limit_bytes(), settings.fast_layout_workers())")
    with cgroup(cpu_quota_cores=1.5, memory_bytes=600 * 2**20) as inside:
        done = subprocess.run([*inside, sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    quota, cores, memory, workers = done.stdout.split()
    assert (float(quota), int(cores), int(memory), int(workers)) == (1.5, min(2, len(os.sched_getaffinity(0))),
                                                                     600 * 2**20, 1)


def test_a_one_core_quota_is_served_by_one_worker_on_one_thread(start_server):
    """Inside a cgroup allowed one core's time (docker run --cpus 1), the host's cores are not counted: one
    worker, one pass at a time on one thread; before, it ran as many threads as the host has cores."""
    with cgroup(cpu_quota_cores=1) as inside:
        server = start_server(launcher=MAIN_PY, prefix=inside)
        assert "python main.py: 1 worker on 1 usable cores" in server.log()
        assert ", 1 threads, 1 at once, batches of up to 8," in server.log()
        key = make_key(server.database_url)
        with server.client(key) as client:
            answer = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())})
        assert answer.status_code == 200
        server.stop()
