"""The server under load, for bench.py: started as `make run` starts it (timed to its first /readyz 200), on given
cores (`taskset`) and workers (WEB_CONCURRENCY); loaded by wrk or by Python clients while a probe reads /v1/usage;
and its CPU time added up by thread group from /proc/PID/task/*/stat, by the names its threads carry
(operations/threads.py):

    event loop   the main thread
    decode       decode_N: body parsing, base64, decode, crop
    database     the database's threads ("database", "database_read_N", or aiosqlite's, which only py-spy can name)
    model        model and model_pool: the model's thread and ONNX Runtime's
    other        the rest: numpy's OpenBLAS threads, uvloop's resolver, AnyIO's workers...
"""

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from db import make_engine, make_sessionmaker, migrate  # noqa: E402
from ledger.keys import create_key  # noqa: E402
from conftest import thread_names, workers_of  # noqa: E402
from servers import free_port  # noqa: E402
from settings import fast_layout_workers  # noqa: E402

GROUPS = ("event loop", "decode", "database", "model", "other")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 300  # a first start exports the graph


@dataclass
class Running:
    process: subprocess.Popen
    url: str
    database_url: str
    ready_s: float  # from the process's start to its first /readyz 200
    pids: list[int]  # the serving processes: the one, or uvicorn's workers


def start(tmp: Path, env: dict[str, str], workers: int | None = 1, cpus: str | None = None) -> Running:
    """`uvicorn main:app` with `workers` (WEB_CONCURRENCY), on `cpus` if given; workers=None: as `make run` starts
    it, `python main.py`, which picks them (the fast layout)."""
    port = free_port()
    database_url = f"sqlite:///{tmp / 'bench.db'}"
    command = ([sys.executable, "main.py", "--port", str(port)] if workers is None else
               [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)])
    full_env = {name: value for name, value in os.environ.items() if name != "WEB_CONCURRENCY"}
    full_env.update({"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", **env})
    if workers is not None:
        full_env["WEB_CONCURRENCY"] = str(workers)
    started = time.monotonic()
    process = subprocess.Popen((["taskset", "-c", cpus] if cpus else []) + command, cwd=ROOT, env=full_env,
                               stdout=open(tmp / f"server-{port}.log", "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
            raise RuntimeError(f"the server did not start: {(tmp / f'server-{port}.log').read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    ready_s = time.monotonic() - started
    expected = workers or fast_layout_workers()
    pids = serving_pids(process.pid, expected)
    # /readyz is answered by the first worker ready; a load run must not start before the others
    while len(pids) < expected or not all(has_loaded_its_model(pid) for pid in pids):
        if time.monotonic() - started > START_TIMEOUT_S:
            raise RuntimeError(f"a worker did not start: {(tmp / f'server-{port}.log').read_text()[-3000:]}")
        time.sleep(0.1)
        pids = serving_pids(process.pid, expected)
    return Running(process, url, database_url, ready_s, pids)


def has_loaded_its_model(pid: int) -> bool:
    """A worker's model threads are named once the model is loaded, just before it starts accepting."""
    try:
        return "model" in thread_names(pid)
    except OSError:  # not started yet
        return False


def serving_pids(pid: int, workers: int) -> list[int]:
    if workers == 1:
        return [pid]
    return workers_of(pid)


def stop(running: Running) -> None:
    os.killpg(running.process.pid, signal.SIGTERM)
    running.process.wait(60)


def memory_mb(pid: int) -> dict[str, float]:
    """Resident now (VmRSS) and at most so far (VmHWM)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "peak_mb": int(status["VmHWM"].split()[0]) / 1024}


def make_keys(database_url: str, count: int) -> list[str]:
    async def create() -> list[str]:
        engine = make_engine(database_url, timeout_s=30)
        try:
            await migrate(engine)
            async with make_sessionmaker(engine)() as session:
                keys = [(await create_key(session, "bench@example.com", 10**9, 60))[0] for _ in range(count)]
                await session.commit()
                return keys
        finally:
            await engine.dispose()

    return asyncio.run(create())


def python_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from py-spy if it is installed: names the threads the OS cannot tell
    apart (aiosqlite's, AnyIO's), which all carry the process's name."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "(.*)"', dump, re.MULTILINE)}


def group_of(pid: int, tid: int, comm: str, python_name: str) -> str:
    if tid == pid:
        return "event loop"
    if comm.startswith("decode"):
        return "decode"
    if comm.startswith("model"):
        return "model"
    if comm.startswith("database") or python_name == "database" or "_connection_worker" in python_name:
        return "database"
    return "other"


def thread_cpu(pids: list[int], names: dict[int, dict[int, str]]) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, thread id) -> (group, CPU seconds so far) for every thread of the serving processes."""
    seconds = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # a thread that has just ended
                continue
            group = group_of(pid, int(task.name), comm, names.get(pid, {}).get(int(task.name), ""))
            seconds[pid, int(task.name)] = (group, (int(fields[11]) + int(fields[12])) / TICKS_PER_S)  # utime+stime
    return seconds


def cpu_between(before: dict[tuple[int, int], tuple[str, float]],
                after: dict[tuple[int, int], tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each group spent between two readings: threads started meanwhile count whole, threads that
    ended meanwhile are lost (AnyIO's idle workers, a few milliseconds)."""
    spent: dict[str, float] = defaultdict(float)
    for thread, (group, seconds) in after.items():
        spent[group] += seconds - before.get(thread, (group, 0.0))[1]
    return spent


def batch_totals(url: str) -> tuple[float, float]:
    """Images run and forward passes so far (inference_batch_size's sum and count)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    total = re.search(r"^inference_batch_size_sum (\S+)", text, re.MULTILINE)
    passes = re.search(r"^inference_batch_size_count (\S+)", text, re.MULTILINE)
    return (float(total[1]), float(passes[1])) if total and passes else (0.0, 0.0)


@contextmanager
def usage_probe(url: str, key: str) -> Iterator[list[float]]:
    """GET /v1/usage every 50 ms while the block runs; yields the list its latencies (ms) go into."""
    latencies: list[float] = []
    stop_probe = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            while not stop_probe.is_set():
                started = time.perf_counter()
                client.get("/v1/usage").raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
                stop_probe.wait(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield latencies
    finally:
        stop_probe.set()
        prober.join()


def wrk(url: str, body: Path, keys: Path, seconds: float, connections: int) -> dict:
    stages = keys.with_suffix(".stages")
    done = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "--latency",
                           "-s", str(ROOT / "bench" / "classify.lua"), f"{url}/v1/classify"],
                          env={**os.environ, "BENCH_BODY": str(body), "BENCH_KEYS": str(keys),
                               "BENCH_STAGES": str(stages)}, capture_output=True, text=True, check=True).stdout
    statuses: dict[str, int] = defaultdict(int)
    for line in stages.read_text().splitlines():
        if line.startswith("status "):
            statuses[line.split()[1]] += int(line.split()[2])
    return {"requests": int(re.search(r"(\d+) requests in", done)[1]),
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", done)[1]),
            "p50_ms": wrk_ms(done, "50"), "p99_ms": wrk_ms(done, "99"), "statuses": dict(statuses)}


def wrk_ms(output: str, percentile: str) -> float:
    value, unit = re.search(rf"^\s*{percentile}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def python_clients(url: str, key: str, body: bytes, seconds: float, clients: int) -> dict:
    """`clients` httpx clients in this process, each posting `body` in a loop (threads: the GIL is shared with
    the probe, as in a Python program that calls the API and also reads its usage)."""
    answers: list[list[tuple[float, int]]] = [[] for _ in range(clients)]  # (ms, status), one list per client
    deadline = time.monotonic() + seconds

    def client_loop(mine: list[tuple[float, int]]) -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status = client.post("/v1/classify", content=body).status_code
                mine.append(((time.perf_counter() - started) * 1000, status))

    started = time.monotonic()
    workers = [threading.Thread(target=client_loop, args=(mine,)) for mine in answers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    every = [answer for mine in answers for answer in mine]
    statuses: dict[str, int] = defaultdict(int)
    for _, status in every:
        statuses[str(status)] += 1
    latencies = [ms for ms, _ in every]
    return {"requests": len(every), "requests_per_s": len(every) / (time.monotonic() - started),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "statuses": dict(statuses)}


def measure(running: Running, key: str, load: Callable[[], dict], images_per_request: int = 1) -> dict:
    """`load` (a wrk or Python-clients run) with the /v1/usage probe alongside, and what it cost: CPU per
    request and per image by thread group, the forward passes' mean batch size, memory after."""
    names = {pid: python_names(pid) for pid in running.pids}
    images_before, passes_before = batch_totals(running.url)
    cpu_before = thread_cpu(running.pids, names)
    with usage_probe(running.url, key) as usage:
        result = load()
    spent = cpu_between(cpu_before, thread_cpu(running.pids, names))
    images_after, passes_after = batch_totals(running.url)
    requests = max(1, result["requests"])
    cpu_ms = {group: spent[group] * 1000 / requests for group in GROUPS}
    return {**result, "images_per_request": images_per_request, "usage_p50_ms": percentile(usage, 50),
            "usage_p99_ms": percentile(usage, 99), "cpu_ms_per_request": cpu_ms,
            "cpu_ms_per_image": {group: ms / images_per_request for group, ms in cpu_ms.items()},
            "mean_batch": (images_after - images_before) / max(1.0, passes_after - passes_before),
            "memory_after": [memory_mb(pid) for pid in running.pids]}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
