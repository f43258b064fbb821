"""`python main.py` (what `make run` starts): `uvicorn main:app` with as many workers as serve most on the cores and
memory the process may use, counting its CPU affinity and its cgroup's CPU quota and memory limit (a container's
--cpus and --memory), not the host's; each worker runs a forward pass per core of its share."""

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from conftest import ROOT, b64, make_key, photo_path, workers_of
from settings import cgroup_folders, cpu_quota_cores, fast_layout_workers, memory_limit_bytes, usable_cores

MAIN_PY = ("main.py",)
CGROUPS = Path("/sys/fs/cgroup")


@contextmanager
def cgroup(quota_cores: float | None = None, memory_bytes: int | None = None) -> Iterator[tuple[str, ...]]:
    """Real cgroups with these limits, made inside this process's own (so nothing leaves the harness's limits),
    and a cgroup without limits inside each, which the command prefix this yields starts a process in: the limits
    are found on the parent, as a container's are above its processes. Removed after the block. Skips the test
    where cgroups cannot be made (not root, or no cgroup v1 cpu and memory trees)."""
    name = f"classify-test-{uuid.uuid4().hex[:8]}"
    if not (CGROUPS / "cpu").is_dir() or not (CGROUPS / "memory").is_dir():
        pytest.skip("no cgroup v1 cpu and memory trees to make cgroups in")
    cpu, memory = cgroup_folders("cpu")[0], cgroup_folders("memory")[0]  # this process's own, first
    limits = {cpu / name: {"cpu.cfs_period_us": 100_000,
                           "cpu.cfs_quota_us": quota_cores and int(quota_cores * 100_000)},
              memory / name: {"memory.limit_in_bytes": memory_bytes}}
    made: list[Path] = []
    try:
        for folder, files in limits.items():
            folder.mkdir()
            made.append(folder)
            for file, limit in files.items():
                if limit is not None:
                    (folder / file).write_text(str(limit))
            (folder / "inner").mkdir()
            made.append(folder / "inner")
    except OSError as exc:
        remove(made)
        pytest.skip(f"cannot make a cgroup here: {exc}")
    joins = "; ".join(f"echo $$ > {folder}/inner/cgroup.procs" for folder in limits)
    try:
        yield ("sh", "-c", f'{joins}; exec "$@"', "sh")
    finally:
        remove(made)


def remove(folders: list[Path]) -> None:
    """Empties and removes cgroups, innermost first; a process killed takes a moment to leave its cgroup."""
    for folder in reversed(folders):
        deadline = time.monotonic() + 10
        while pids := (folder / "cgroup.procs").read_text().split():
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            assert time.monotonic() < deadline, f"{folder} still holds {pids}"
            time.sleep(0.05)
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
    """--workers 1 (not the fast layout's count here) is given to uvicorn as WEB_CONCURRENCY, so the one worker
    takes every core: one process, a pass per core."""
    server = start_server(launcher=MAIN_PY, args=("--workers", "1"))
    cores = usable_cores()
    assert f"python main.py: 1 worker on {cores} usable cores" in server.log()
    assert f", {cores} threads, {cores} at once, batches of up to 8," in server.log()
    assert not workers_of(server.process.pid)


@pytest.mark.parametrize("args", [("--workers=two",), ("--workers", "0"), ("--workers",)])
def test_a_worker_count_not_a_whole_number_of_at_least_one_stops_the_start_in_one_line(args):
    done = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MODEL_NAME": "efficientnet_lite0"})
    assert done.returncode == 1
    value = args[0].partition("=")[2] if "=" in args[0] else (args[1] if len(args) > 1 else "")
    message = f"cannot start: --workers {value!r} is not a whole number of at least 1"
    assert done.stderr.strip().splitlines() == [message]


def test_the_cgroup_limits_are_the_ones_counted():
    """A quota of 1.5 cores' time counts as 2 cores (rounded up, as Go and the JVM do), never more than the
    affinity gives; a 600 MiB memory limit is read as such, and leaves room for one worker (WORKER_MEMORY_BYTES),
    where the cores alone would have made two."""
    probe = ("import settings; print(settings.cpu_quota_cores(), settings.usable_cores(), "
             "settings.memory_limit_bytes(), settings.fast_layout_workers())")
    with cgroup(quota_cores=1.5, memory_bytes=600 * 2**20) as inside:
        done = subprocess.run([*inside, sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    quota, cores, memory, workers = done.stdout.split()
    assert (float(quota), int(cores), int(memory), int(workers)) == (1.5, min(2, len(os.sched_getaffinity(0))),
                                                                     600 * 2**20, 1)


def test_a_one_core_quota_is_served_by_one_worker_on_one_thread(start_server):
    """Inside a cgroup allowed one core's time (docker run --cpus 1), the host's cores are not counted: one
    worker, one pass at a time on one thread; before, it ran as many threads as the host has cores."""
    with cgroup(quota_cores=1) as inside:
        server = start_server(launcher=MAIN_PY, prefix=inside)
        assert "python main.py: 1 worker on 1 usable cores" in server.log()
        assert ", 1 threads, 1 at once, batches of up to 8," in server.log()
        key = make_key(server.database_url)
        with server.client(key) as client:
            answer = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())})
        assert answer.status_code == 200
        server.stop()


def cgroup_tree(root: Path, membership: str, files: dict[str, str]) -> Path:
    """A cgroup file system's files as the kernel shows them, under `root`, and the membership file that places a
    process in it: the layouts this machine does not have (v2, a container's view of v1)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    (root / "membership").write_text(membership)
    return root / "membership"


def test_cgroup_v2_limits_are_read_from_the_process_cgroup_and_every_one_above_it(tmp_path):
    """cgroup v2 (one tree, "0::/path"): a 1.5-core cpu.max and a 600 MiB memory.max set on the parent apply to a
    child that sets none ("max")."""
    membership = cgroup_tree(tmp_path, "0::/user.slice/app\n", {
        "user.slice/cpu.max": "150000 100000", "user.slice/memory.max": str(600 * 2**20),
        "user.slice/app/cpu.max": "max 100000", "user.slice/app/memory.max": "max"})
    assert cpu_quota_cores(tmp_path, membership) == 1.5
    assert memory_limit_bytes(tmp_path, membership) == 600 * 2**20


def test_a_container_sees_its_own_cgroup_v1_as_the_root_under_the_host_path(tmp_path):
    """Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path (/docker/<id>), while
    the container's own cgroup is mounted at each tree's root; a combined cpu,cpuacct tree counts as cpu."""
    membership = cgroup_tree(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "250000", "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": str(2**30)})
    assert cpu_quota_cores(tmp_path, membership) == 2.5
    assert memory_limit_bytes(tmp_path, membership) == 2**30


def test_no_limits_are_none_and_the_machine(tmp_path):
    """Unbounded (v1's -1 quota and its near-2^63 memory limit, v2's "max"): no quota, the machine's memory."""
    membership = cgroup_tree(tmp_path, "2:cpu:/\n1:memory:/\n0::/\n", {
        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": "9223372036854771712", "cpu.max": "max 100000"})
    assert cpu_quota_cores(tmp_path, membership) is None
    assert memory_limit_bytes(tmp_path, membership) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
