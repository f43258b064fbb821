"""Graceful shutdown: what SIGTERM (or Ctrl-C) starts, on top of what uvicorn does with it.

Uvicorn's own handler stops accepting connections, closes idle ones, waits for running requests and then runs
the app's shutdown. On top of it, `chain_termination_handlers` runs a callback of ours first: main.py's records
the shutdown deadline (now + SHUTDOWN_TIMEOUT_S), so /v1/classify requests that still arrive (on a connection
that was open) get a 503 `shutting_down` instead of joining the queue, and tells the batcher to answer whatever
is still queued at the deadline with a 503. So every request the server took is answered, and logged, and the
process exits within about SHUTDOWN_TIMEOUT_S however long its queue was.
"""

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger("classify")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def chain_termination_handlers(callback: Callable[[], None]) -> None:
    """Runs `callback` in the event loop on SIGTERM/SIGINT, then the handler that was there (uvicorn's).

    Uvicorn installs its handlers with signal.signal before the app starts, and puts the originals back after
    it stops, which removes this chain too. Outside uvicorn's main thread there is nothing to chain onto."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # not served by uvicorn's Server (SIG_DFL/SIG_IGN): leave the default alone

        def handler(signum: int, frame: FrameType | None, previous: Callable = previous) -> None:
            loop.call_soon_threadsafe(callback)  # a signal handler may interrupt the loop anywhere: schedule
            previous(signum, frame)

        signal.signal(sig, handler)
