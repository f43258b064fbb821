"""The server's threads as the operating system sees them: names that `top -H`, `ps -L` and
/proc/PID/task/*/comm show (and `make bench` adds CPU time up by), and the model's lower priority.

    (the process's name)  the event loop: the main thread, whose thread id is the process id
    decode_N              the decoding pool: body parsing, base64, decode, crop (edge/image_requests.py)
    model                 the model's threads, one per batch run at once (PARALLEL_BATCHES), each running its
                          forward passes (engine/batching.py)
    model_pool            ONNX Runtime's (or torch's) own threads, started from a model thread, when a pass has
                          more than one thread (PARALLEL_BATCHES=1)
"""

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL_THREAD = "model"
MODEL_POOL = "model_pool"
MODEL_NICENESS = 10


def name_os_thread(name: str | None = None) -> None:
    """Gives the calling thread `name` (by default its Python name) as the OS shows it; Linux keeps 15 bytes."""
    if sys.platform == "linux":  # Python 3.11 names threads for itself only
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_bytes(
            (name or threading.current_thread().name).encode()[:15])


def lower_priority() -> None:
    # Linux niceness is per thread, and threads inherit it: the model's threads (ONNX Runtime's and torch's
    # pools are created from this one) give way to the event loop, the decoders and the database, so
    # /v1/usage and health checks stay quick while the model keeps every core busy. 10, measured with 8 clients:
    # at 0 /v1/usage took 40 / 168 ms (p50 / p99) and the model 1.22x its raw CPU per image (batches of 1.7 on
    # average), at 10 14 / 63 ms and 1.07x (3.8), at 19 12 / 50 ms and 1.10x with 9% fewer requests answered.
    if sys.platform == "linux":  # elsewhere this call would lower the whole process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MODEL_NICENESS)


def start_model_thread() -> None:
    """The model thread's initializer: its name, and a lower priority, both inherited by the runtime's threads."""
    name_os_thread(MODEL_THREAD)
    lower_priority()


def name_model_pool() -> None:
    """Called on the model's thread once the runtime has started its pool: the threads that inherited this one's
    name get their own, so CPU time tells the thread that hands batches over from the ones that only compute."""
    if sys.platform != "linux":
        return
    this_thread = threading.get_native_id()
    for task in Path("/proc/self/task").iterdir():
        comm = task / "comm"
        try:
            if int(task.name) != this_thread and comm.read_text().strip() == MODEL_THREAD:
                comm.write_text(MODEL_POOL)
        except OSError:  # a thread that has just ended
            pass


async def start_every_thread(executor: ThreadPoolExecutor, count: int) -> None:
    """Makes the executor start all `count` of its threads now (it starts them only as work overlaps), so each
    is named and niced before it runs a request's batch."""
    everyone_started = threading.Barrier(count, timeout=60)
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(executor, everyone_started.wait) for _ in range(count)))
