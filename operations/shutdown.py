"""Graceful shutdown: what SIGTERM (or Ctrl-C) starts, on top of what uvicorn does with it.

Uvicorn's own handler stops accepting connections, closes idle ones, waits for running requests and then runs
the app's shutdown. On top of it, `chain_termination_handlers` runs a callback of ours first: main.py's sets
the shutdown deadline (now + SHUTDOWN_TIMEOUT_S) on the app's `Shutdown`, so /v1/classify requests that still
arrive (on a connection that was open) get a 503 `shutting_down` instead of joining the queue, a body still
arriving at the deadline is cut short with the same 503 (`bounding`), and the batcher answers whatever is
still queued at the deadline with a 503. So every request the server took is answered, and logged, and the
process exits within about SHUTDOWN_TIMEOUT_S however long its queue was or however slow a sender.

A second Ctrl-C makes uvicorn stop waiting for requests. Before it is handed on, the deadline becomes now: the
bodies still arriving and the images still queued are answered 503 at once, and have SECOND_SIGNAL_GRACE_S
for those answers (and their log rows) to go out.
"""

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SECOND_SIGNAL_GRACE_S = 0.5  # a 503 and its log row take milliseconds; uvicorn then cancels what is left


class ShuttingDown(Exception):
    """The server is stopping and its shutdown deadline passed before this request's body or images were done."""


class Shutdown:
    """The shutdown deadline (time.monotonic()), None until a stop signal; and the timeouts it cuts short."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self._bounded: set[asyncio.Timeout] = set()

    def cut_to(self, deadline: float) -> bool:
        """Brings the deadline forward to `deadline` (never back); False if it was already as early."""
        if self.deadline is not None and self.deadline <= deadline:
            return False
        self.deadline = deadline
        for timeout in self._bounded:
            self._cut(timeout)
        return True

    @contextmanager
    def bounding(self, timeout: asyncio.Timeout) -> Iterator[None]:
        """Inside the block, `timeout` (an `asyncio.timeout`) expires by the shutdown deadline too, if there is one
        or one comes."""
        self._cut(timeout)
        self._bounded.add(timeout)
        try:
            yield
        finally:
            self._bounded.discard(timeout)

    def _cut(self, timeout: asyncio.Timeout) -> None:
        if self.deadline is None or timeout.expired():
            return
        when = asyncio.get_running_loop().time() + (self.deadline - time.monotonic())
        current = timeout.when()
        if current is None or when < current:
            timeout.reschedule(when)


def chain_termination_handlers(callback: Callable[[bool], None]) -> None:
    """Runs `callback(False)` in the event loop on SIGTERM/SIGINT, then the handler that was there (uvicorn's);
    on a SIGINT after the first signal (a second Ctrl-C), `callback(True)`, and uvicorn's handler only
    SECOND_SIGNAL_GRACE_S later.

    Uvicorn installs its handlers with signal.signal before the app starts, and puts the originals back after
    it stops, which removes this chain too. Outside uvicorn's main thread there is nothing to chain onto."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    signalled = False
    for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # not served by uvicorn's Server (SIG_DFL/SIG_IGN): leave the default alone

        def handler(signum: int, frame: FrameType | None, previous: Callable = previous) -> None:
            nonlocal signalled
            is_second_ctrl_c = signalled and signum == signal.SIGINT
            signalled = True
            loop.call_soon_threadsafe(callback, is_second_ctrl_c)  # a signal may interrupt the loop anywhere
            if is_second_ctrl_c:
                loop.call_soon_threadsafe(loop.call_later, SECOND_SIGNAL_GRACE_S, previous, signum, None)
            else:
                previous(signum, frame)

        signal.signal(sig, handler)
