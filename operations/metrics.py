"""Prometheus metrics: where their numbers live, and the GET /metrics route that reports them.

    from operations.metrics import Counter, Histogram   # not from prometheus_client: this module must be imported first

Each metric is defined once, at module level, in the file that updates it (ledger/request_log.py: requests and
their latency by route; engine/batching.py: forward passes, batch sizes, queue depth; edge/image_requests.py:
rate-limit refusals; main.py: the model's identity; ledger/keys.py: refused keys). This module only decides
where the numbers are kept.

One process keeps them in memory (prometheus-client's default registry). Under `uvicorn --workers N` each
worker is a child process with its own memory, and a scrape reaches only one of them; so there every worker
writes its numbers to files in one directory, and a scrape sums the files of all (prometheus-client's
multiprocess mode). prometheus-client picks memory or files when it is imported, from PROMETHEUS_MULTIPROC_DIR:
that is why the variable is set here, before the import, and why other modules import the metric classes
from here. A worker's live gauges (the queue depth) leave the sums when it stops, or, if it was killed, when
the next worker starts or the next scrape comes.
"""

import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

DIRECTORY_PREFIX = "classify-metrics-"


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _prepare_multiprocess_directory() -> None:
    """In a worker of `uvicorn --workers N`: one directory for all the workers of this server, named after
    their parent (the supervisor), emptied of earlier servers' directories whose supervisor is gone."""
    parent = multiprocessing.parent_process()
    if parent is None or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # one process, or the operator chose the directory (and cleans it between runs)
    base = Path(tempfile.gettempdir())
    for stale in base.glob(DIRECTORY_PREFIX + "*"):
        pid = stale.name.removeprefix(DIRECTORY_PREFIX)
        if pid.isdigit() and int(pid) != parent.pid and not _is_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    directory = base / f"{DIRECTORY_PREFIX}{parent.pid}"
    directory.mkdir(exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


_prepare_multiprocess_directory()

from fastapi import APIRouter, Response  # noqa: E402
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["Counter", "Gauge", "Histogram", "is_multiprocess", "render", "process_stopped", "router"]


def is_multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _is_sibling(pid: int, parent_pid: int) -> bool:
    """Whether `pid` is a running child of `parent_pid`: a gone worker's pid may since belong to anything."""
    if sys.platform != "linux":
        return _is_alive(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # after "pid (command name)"
    return state != "Z" and int(ppid) == parent_pid


def forget_gone_workers() -> None:
    """Takes the live gauges (queue depth) of workers that are gone out of the sums, as their clean stop would
    have (process_stopped): a worker killed with SIGKILL, or by the OOM killer, never got to."""
    parent = multiprocessing.parent_process()
    if not is_multiprocess() or parent is None or parent.pid is None:
        return
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _is_sibling(int(pid), parent.pid):
            multiprocess.mark_process_dead(int(pid), directory)


forget_gone_workers()  # as each worker starts (uvicorn replaces one that died)


def render() -> tuple[bytes, str]:
    """The text exposition of every metric (of every worker, in multiprocess mode), and its content type."""
    if not is_multiprocess():
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    forget_gone_workers()  # and before each scrape, so a worker gone a moment ago is already out of the sum
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_stopped() -> None:
    """A worker that stops takes its live gauges (queue depth) out of the sums; its counters stay counted."""
    if is_multiprocess():
        multiprocess.mark_process_dead(os.getpid())


router = APIRouter()  # main.create_app includes it unless METRICS_ENABLED=false


@router.get("/metrics", tags=["operations"], response_class=Response,
            responses={200: {"description": "Prometheus' text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics_text() -> Response:
    """Prometheus metrics: requests and latency by route, inference, batches, queue, refusals, the model."""
    body, content_type = render()
    return Response(body, media_type=content_type)
