"""The server's threads as the operating system sees them: names that `top -H`, `ps -L` and
/proc/PID/task/*/comm show (and `make bench` adds CPU time up by), and the model's lower priority.

    (the process's name)  the event loop: the main thread, whose thread id is the process id
    decode_N              the decoding pool: body parsing, base64, decode, crop (main.py)
    model                 the model's thread, which runs every forward pass (batching.py)
    model_pool            ONNX Runtime's (or torch's) own threads, started from the model's thread
"""

import os
import sys
import threading
from pathlib import Path

MODEL_THREAD = "model"
MODEL_POOL = "model_pool"
MODEL_NICENESS = 10


def name_os_thread(name: str | None = None) -> None:
    """Gives the calling thread `name` (by default its Python name) as the OS shows it; Linux keeps 15 bytes."""
    if sys.platform == "linux":  # Python 3.11 names threads for itself only
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_bytes(
            (name or threading.current_thread().name).encode()[:15])


def start_model_thread() -> None:
    """The model thread's initializer: its name, and a lower priority that the runtime's threads inherit."""
    name_os_thread(MODEL_THREAD)
    # Linux niceness is per thread, and threads inherit it: the model's threads (ONNX Runtime's and torch's
    # pools are created from this one) give way to the event loop, the decoders and the database, so
    # /v1/usage and health checks stay quick while the model keeps every core busy.
    if sys.platform == "linux":  # elsewhere this call would lower the whole process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MODEL_NICENESS)



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
