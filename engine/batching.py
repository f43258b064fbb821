"""The batching worker: the model's threads run the images that are waiting as batches, PARALLEL_BATCHES at once.

Requests put their preprocessed images on a queue and await futures; once a model thread is free the worker takes
up to MAX_BATCH of them, waiting at most BATCH_WAIT_MS for more while more are being decoded, runs them as one
forward pass on that thread, and answers each future.
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
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from engine.runtimes import Backend, Outputs
from operations.metrics import Gauge, Histogram
from operations.shutdown import ShuttingDown

logger = logging.getLogger("classify")

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


class InferenceFailed(Exception):
    """The forward pass that held the image failed (the server log has why): a bug, so a 500."""


@dataclass(eq=False)
class Pending:
    image: np.ndarray  # (224, 224, 3) uint8
    deadline: float  # time.monotonic() after which it is not worth running
    future: asyncio.Future["Answer"]
    enqueued: float = field(default_factory=time.monotonic)
    is_started: bool = False  # a forward pass has taken it: the deadline no longer applies


@dataclass(frozen=True)
class Answer:
    probabilities: np.ndarray  # (N,)
    embedding: np.ndarray | None  # (D,), not normalised; None if the model has no embedding
    batch_size: int  # images in the forward pass that answered this one
    queue_ms: float  # from the queue to the start of that pass
    model_ms: float  # the pass itself


class Batcher:
    """Owns the model's threads: requests take queue places (`reservation`), queue their images with `infer`, and
    await them."""

    def __init__(self, backend: Backend, max_batch: int, batch_wait_ms: float, max_queue: int,
                 model_threads: ThreadPoolExecutor, parallel_batches: int = 1) -> None:
        self.backend = backend
        self.parallel_batches = parallel_batches
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_queue = max_queue
        self.model_threads = model_threads  # one per batch run at once: the backend is built and run only there
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.accepted = 0  # images reserved and not yet answered: what MAX_QUEUE bounds
        self._places_lock = threading.Lock()  # `accepted` changes in the event loop and the database's thread
        self.coming = 0  # admitted images being decoded (images_coming)
        self.is_stopped = False  # past the shutdown deadline: nothing more is run
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches being run

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batching-worker")
        self._worker.add_done_callback(_log_if_failed)

    @property
    def is_running(self) -> bool:
        """False once the worker has stopped: every request would wait for nothing, so /readyz says so."""
        return self._worker is not None and not self._worker.done()

    def has_room(self, image_count: int = 1) -> bool:
        return self.accepted + image_count <= self.max_queue

    @contextmanager
    def reservation(self) -> Iterator[Callable[[int], None]]:
        """`take(image_count)`: room for that many images until the block ends, or Overloaded at once (a full
        queue makes no one wait). Called as the request is admitted, not before: while it waits for its
        admission (the database's lock) it holds no place. `take` may be called from the database's thread
        (ledger/writer.py); once the block has ended it takes nothing and raises Overloaded."""
        taken = 0
        is_open = True

        def take(image_count: int) -> None:
            nonlocal taken
            with self._places_lock:
                if not is_open or not self.has_room(image_count):
                    raise Overloaded
                self.accepted += image_count
                taken += image_count
                QUEUE_DEPTH.set(self.accepted)

        try:
            yield take
        finally:
            with self._places_lock:
                is_open = False
                self.accepted -= taken
                QUEUE_DEPTH.set(self.accepted)

    @contextmanager
    def images_coming(self, image_count: int) -> Iterator[None]:
        """Admitted images on their way to the queue (being decoded): a batch waits BATCH_WAIT_MS for more only
        while some are. Submit them inside the block, so the batch sees them queued as the count drops."""
        self.coming += image_count
        try:
            yield
        finally:
            self.coming -= image_count

    def infer(self, images: list[np.ndarray], deadline: float) -> asyncio.Future[list[Answer]]:
        """Queues the images at once; the future gives their answers, in order. Call with room taken for them
        (`reservation`).

        The future fails with DeadlineExceeded if an image is still queued at `deadline` (one already in a forward
        pass is waited for: that takes one pass at most), with ShuttingDown past the shutdown deadline. If it is
        cancelled (its client went away), the images still queued are dropped, not run.
        """
        loop = asyncio.get_running_loop()
        if self.is_stopped or time.monotonic() >= deadline:
            refused = loop.create_future()
            refused.set_exception(ShuttingDown() if self.is_stopped else DeadlineExceeded())
            return refused
        pendings = [Pending(image, deadline, loop.create_future()) for image in images]
        for pending in pendings:
            self.queue.put_nowait(pending)
        answers = asyncio.ensure_future(self._answers(pendings, deadline))
        # Cancelled before it first ran, the task never reaches its `finally`: its images leave the queue here.
        answers.add_done_callback(lambda done: done.cancelled() and _cancel_all(pendings))
        return answers

    async def _answers(self, pendings: list[Pending], deadline: float) -> list[Answer]:
        loop = asyncio.get_running_loop()
        answers = asyncio.gather(*(pending.future for pending in pendings))
        # A caller that goes away (its client hung up) leaves this failed with CancelledError and unread: read, it
        # is not logged as a lost exception, an ERROR line for every cancellation.
        answers.add_done_callback(_read_outcome)
        try:
            try:
                async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
                    return list(await asyncio.shield(answers))
            except TimeoutError:
                if not any(pending.is_started for pending in pendings):
                    raise DeadlineExceeded from None
                return list(await answers)  # the worker fails the ones still queued: they are past the deadline
        finally:
            for pending in pendings:
                # Cancelled ones are skipped by the worker; a failed one's error is marked as seen, or asyncio
                # would log it as lost.
                if not pending.future.cancel() and not pending.future.cancelled():
                    pending.future.exception()

    async def _run(self) -> None:
        free = asyncio.Semaphore(self.parallel_batches)
        while True:
            await free.acquire()  # a batch is formed only once a model thread is free to run it
            batch = await self._next_batch()
            running = asyncio.create_task(self._run_and_answer(batch))
            self._running.add(running)
            running.add_done_callback(lambda done: (self._running.discard(done), free.release()))

    async def _run_and_answer(self, batch: list[Pending]) -> None:
        try:
            await self._run_batch(batch)
        except Exception:  # a bug here must not stop the worker, or every later request would wait in vain
            logger.exception("a batch of %d images failed", len(batch))
        finally:  # failed, or cancelled as the server stops: no waiter is left without an answer
            for pending in batch:
                if not pending.future.done():
                    # One exception each: a shared one would collect every waiter's frames in its traceback.
                    pending.future.set_exception(InferenceFailed("the forward pass failed"))

    async def _run_batch(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        live = [pending for pending in batch if not pending.future.done() and pending.deadline > now]
        for expired in (pending for pending in batch if not pending.future.done() and pending.deadline <= now):
            expired.future.set_exception(DeadlineExceeded())
        if not live:
            return
        for pending in live:
            pending.is_started = True
        started = time.monotonic()
        outputs = await asyncio.get_running_loop().run_in_executor(self.model_threads, self._forward,
                                                                   [pending.image for pending in live])
        probabilities = outputs.probabilities  # (B, N)
        if len(probabilities) != len(live):
            raise RuntimeError(f"the model returned {len(probabilities)} rows for {len(live)} images")
        embeddings = outputs.embeddings if outputs.embeddings is not None else [None] * len(live)  # (B, D)
        model_ms = (time.monotonic() - started) * 1000
        INFERENCE_SECONDS.observe(model_ms / 1000)
        BATCH_SIZE.observe(len(live))
        for pending, row, embedding in zip(live, probabilities, embeddings):
            if not pending.future.done():
                pending.future.set_result(Answer(row, embedding, len(live), (started - pending.enqueued) * 1000,
                                                 model_ms))

    def _forward(self, images: list[np.ndarray]) -> Outputs:
        return self.backend.run(np.stack(images))  # (B, 224, 224, 3): stacked here, off the event loop

    async def _next_batch(self) -> list[Pending]:
        """Up to max_batch live images: waits for one, then at most batch_wait_s for more if some are on their
        way (being decoded: `images_coming`, read before each wait), not for requests that may never come.
        Images whose request has gone (cancelled futures) are skipped here, so they never take a place in a batch."""
        batch: list[Pending] = []
        wait_until = math.inf
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                pending = self.queue.get_nowait()
            elif not batch:
                pending = await self.queue.get()
            else:
                remaining = wait_until - time.monotonic()
                if remaining <= 0 or self.coming == 0:
                    break
                try:
                    pending = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if not pending.future.done():
                if not batch:
                    wait_until = time.monotonic() + self.batch_wait_s
                batch.append(pending)
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

    async def stop(self) -> None:
        """Stops the worker; anything still queued (uvicorn waits for requests first, so normally nothing) is
        answered with InferenceFailed rather than left waiting."""
        tasks = [task for task in (self._worker, *self._running) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(InferenceFailed("the server stopped before the forward pass"))


def _cancel_all(pendings: list[Pending]) -> None:
    for pending in pendings:
        pending.future.cancel()


def _read_outcome(future: asyncio.Future[list[Answer]]) -> None:
    if not future.cancelled():
        future.exception()


def _log_if_failed(worker: asyncio.Task[None]) -> None:
    if not worker.cancelled() and (exc := worker.exception()) is not None:
        logger.critical("the batching worker stopped; /readyz answers 503 from now on", exc_info=exc)
