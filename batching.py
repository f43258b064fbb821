"""The batching worker: one thread owns the model and runs the images that are waiting as one batch.

Requests put their preprocessed images on a queue and await futures; the worker takes up to MAX_BATCH of them,
waiting at most BATCH_WAIT_MS for more once it has one, runs them as one forward pass, and answers each future.
The queue is bounded (MAX_QUEUE images accepted and not yet answered), so overload is refused at once instead of
queueing forever, and every image has a deadline after which it is dropped rather than run.

Shaped like LitServe's batched loop, simplified: an asyncio queue of small dataclasses, a deadline per image,
one failed batch answers all its waiters with the error.

Shutdown (SIGTERM, wired in main.py): `stop_by(deadline)` lets the accepted images run until the deadline;
any still queued then are answered with ShuttingDown (a 503) rather than left to hang, so the server exits
within SHUTDOWN_TIMEOUT_S however long the queue was.
"""

import asyncio
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from backends import Backend
from metrics import Gauge, Histogram

logger = logging.getLogger("classify")

MODEL_NICENESS = 10

INFERENCE_SECONDS = Histogram("inference_seconds", "Duration of one forward pass (a whole batch).",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_SIZE = Histogram("inference_batch_size", "Images in one forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
# livesum: under --workers N, the sum over the workers that are running (a stopped one's queue is gone).
QUEUE_DEPTH = Gauge("inference_queue_depth", "Images accepted and not yet answered (what MAX_QUEUE bounds).",
                    multiprocess_mode="livesum")


class Overloaded(Exception):
    """The queue is full: the caller should answer 503 with Retry-After."""


class DeadlineExceeded(Exception):
    """The image waited past its request's deadline and was not run."""


class ShuttingDown(Exception):
    """The server is stopping and its shutdown deadline passed before this image was run."""


@dataclass(eq=False)
class Pending:
    image: np.ndarray  # (224, 224, 3) uint8
    deadline: float  # time.monotonic() after which it is not worth running
    future: asyncio.Future["Answer"]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Answer:
    probabilities: np.ndarray  # (1000,)
    batch_size: int  # images in the forward pass that answered this one
    queue_ms: float  # from the queue to the start of that pass
    model_ms: float  # the pass itself


def lower_priority() -> None:
    # Linux niceness is per thread, and threads inherit it: the model's threads (ONNX Runtime's and torch's
    # pools are created from this one) give way to the event loop, the decoders and the database, so
    # /v1/usage and health checks stay quick while the model keeps every core busy.
    if sys.platform == "linux":  # elsewhere this call would lower the whole process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MODEL_NICENESS)


class Batcher:
    def __init__(self, backend: Backend, max_batch: int, batch_wait_ms: float, max_queue: int,
                 model_thread: ThreadPoolExecutor) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_queue = max_queue
        self.model_thread = model_thread  # one thread: the backend is built and run only there
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.accepted = 0  # images reserved and not yet answered: what MAX_QUEUE bounds
        self.batch_sizes: Counter[int] = Counter()  # forward passes by size, since start
        self.is_draining = False
        self.is_stopped = False  # past the shutdown deadline: nothing more is run
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batching-worker")

    @contextmanager
    def reserve(self, images: int) -> Iterator[None]:
        """Room for `images` until the block ends, or Overloaded now: a full queue never makes anyone wait."""
        if self.is_draining or self.accepted + images > self.max_queue:
            raise Overloaded
        self.accepted += images
        QUEUE_DEPTH.set(self.accepted)
        try:
            yield
        finally:
            self.accepted -= images
            QUEUE_DEPTH.set(self.accepted)

    async def infer(self, images: list[np.ndarray], deadline: float) -> list[Answer]:
        """Probabilities for each image, in order. Call inside `reserve(len(images))`.

        Raises DeadlineExceeded if they are still queued at `deadline`; if the caller is cancelled (its client
        went away), the images still queued are dropped, not run.
        """
        if self.is_stopped:
            raise ShuttingDown
        loop = asyncio.get_running_loop()
        pendings = [Pending(image, deadline, loop.create_future()) for image in images]
        for pending in pendings:
            self.queue.put_nowait(pending)
        try:
            async with asyncio.timeout_at(loop.time() + max(0.0, deadline - time.monotonic())):
                return list(await asyncio.gather(*(pending.future for pending in pendings)))
        except TimeoutError:
            raise DeadlineExceeded from None
        finally:
            for pending in pendings:
                # Cancelled ones are skipped by the worker; a failed one's error is marked as seen, or asyncio
                # would log it as lost.
                if not pending.future.cancel() and not pending.future.cancelled():
                    pending.future.exception()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            now = time.monotonic()
            live = [p for p in batch if not p.future.done() and p.deadline > now]
            for expired in (p for p in batch if not p.future.done() and p.deadline <= now):
                expired.future.set_exception(DeadlineExceeded())
            if not live:
                continue
            x = np.stack([p.image for p in live])  # (B, 224, 224, 3)
            started = time.monotonic()
            try:
                probabilities = await loop.run_in_executor(self.model_thread, self.backend.run, x)  # (B, 1000)
                if len(probabilities) != len(live):
                    raise RuntimeError(f"the model returned {len(probabilities)} rows for {len(live)} images")
            except Exception as exc:
                logger.exception("forward pass of %d images failed", len(live))
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            model_ms = (time.monotonic() - started) * 1000
            self.batch_sizes[len(live)] += 1
            INFERENCE_SECONDS.observe(model_ms / 1000)
            BATCH_SIZE.observe(len(live))
            for pending, row in zip(live, probabilities):
                if not pending.future.done():
                    pending.future.set_result(Answer(row, len(live), (started - pending.enqueued) * 1000, model_ms))

    async def _next_batch(self) -> list[Pending]:
        batch = [await self.queue.get()]
        wait_until = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    def stop_by(self, deadline: float) -> None:
        """Run what is queued until `deadline` (time.monotonic()); then answer the rest with ShuttingDown."""
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, deadline - time.monotonic()), self._refuse_queued)

    def _refuse_queued(self) -> None:
        self.is_stopped = True
        refused = 0
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown())
                refused += 1
        if refused:
            logger.warning("shutdown deadline reached: %d queued images answered 503 unrun", refused)

    async def drain(self) -> None:
        """Refuse new work, let what was accepted finish, then stop the worker."""
        self.is_draining = True
        while self.accepted:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
