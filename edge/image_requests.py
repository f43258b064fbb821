"""What every image request goes through, /v1/classify's and /v1/embeddings' alike (`run_images`): the
refusals that need no body, the body, the rate limit (each image counts one, all or none), an Idempotency-Key's
claim, decoding, and the forward pass. The routes in main.py turn the answers into their own shapes.
"""

import asyncio
import time

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from db import ApiKey, not_waiting_for_the_database
from edge.request_body import BodyRoom, ImagesToClassify, decode_images, parse_body, read_body
from edge.schemas import ClassifyRequest, ImagesRequest
from engine.batching import Answer, Batcher, DeadlineExceeded, Overloaded
from inference import LoadedModel
from ledger.idempotency import Claim, claim_for, has_stored_answer, requested_key
from ledger.ratelimit import Decision, OnAdmit, SlidingWindowLimiter
from ledger.request_log import add_timing
from operations import metrics
from operations.errors import ApiError, NotAdmitted
from operations.shutdown import ShuttingDown
from settings import Settings

RATE_LIMITED = metrics.Counter("rate_limit_rejections_total", "/v1/classify requests refused with 429.")


def rate_limit_headers(decision: Decision, window_s: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_s),
        # draft-ietf-httpapi-ratelimit-headers: the policy, then where this client stands in it
        "RateLimit-Policy": f'"default";q={decision.limit};w={window_s}',
        "RateLimit": f'"default";r={decision.remaining};t={decision.reset_s}',
    }


async def charge(request: Request, key: ApiKey, limiter: SlidingWindowLimiter, cost: int,
                 on_admit: OnAdmit | None = None, claim: Claim | None = None) -> None:
    """`cost` slots of the key's window (all or none), or a 429. Counts whatever happens to the request next.
    With an idempotency `claim`, a repeat is answered (ledger/idempotency.Replayed, 409, 422) before anything is counted."""
    started = time.perf_counter()
    decision = await limiter.hit(key.id, key.rate_limit, key.window_s, cost, on_admit, claim)
    add_timing(request, "limit", started)
    refuse_if_full(request, key, decision, cost)


def refuse_if_full(request: Request, key: ApiKey, decision: Decision, cost: int = 1) -> None:
    request.state.rate_limit_headers = rate_limit_headers(decision, key.window_s)  # on every answer, errors too
    if not decision.allowed:
        RATE_LIMITED.inc()
        raise ApiError(429, "rate_limit_exceeded",
                       f"This key may make {key.rate_limit} requests per {key.window_s} s"
                       f"{f' (this one counts {cost})' if cost > 1 else ''}; retry in {decision.retry_after_s} s.",
                       {"Retry-After": str(decision.retry_after_s)})


async def wait_for_disconnect(request: Request) -> None:
    # Once the body is read, the server's next message for this request is http.disconnect: the client left.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def infer(request: Request, inference: asyncio.Future[list[Answer]]) -> list[Answer]:
    """The batcher's answers; 504 past the deadline, and nothing run for a client that has gone, unless its
    answer is to be stored for an Idempotency-Key: its retry will ask for it."""
    is_kept = getattr(request.state, "idempotency_claim", None) is not None
    disconnect = (asyncio.get_running_loop().create_future() if is_kept  # never done: the client is not watched
                  else asyncio.ensure_future(wait_for_disconnect(request)))
    try:
        done, _ = await asyncio.wait({inference, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not inference.done():
            inference.cancel()  # the client has gone, or this request was cancelled: its images leave the queue
    if inference not in done:
        raise ApiError(499, "client_closed_request", "The client closed the connection before the answer.")
    try:
        return inference.result()
    except ShuttingDown:
        raise shutting_down() from None
    except DeadlineExceeded:
        raise ApiError(504, "request_timeout", "The server could not classify this within REQUEST_TIMEOUT_S "
                                               "(it is overloaded); retry later.", {"Retry-After": "1"}) from None


def shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "The server is shutting down; retry, and you will reach another "
                                          "instance or this one once it is back.", {"Retry-After": "1", "Connection": "close"})


def overloaded(max_queue: int) -> ApiError:
    return ApiError(503, "overloaded", f"The server is classifying as fast as it can and has {max_queue} images "
                                       "waiting (MAX_QUEUE); retry shortly.", {"Retry-After": "1"})


def check_image_count(count: int, key: ApiKey, settings: Settings) -> None:
    if count > settings.max_images_per_request:
        raise ApiError(422, "too_many_images", f"A request may carry at most {settings.max_images_per_request} "
                                               f"images (MAX_IMAGES_PER_REQUEST); this one has {count}. Split it.")
    if count > key.rate_limit:
        raise ApiError(422, "too_many_images", f"Each image counts one request, and this key may make only "
                                               f"{key.rate_limit} per {key.window_s} s; send at most {key.rate_limit}.")


async def read_classify_request(request: Request, key: ApiKey, settings: Settings, limiter: SlidingWindowLimiter,
                                room: BodyRoom, schema: type[ImagesRequest] = ClassifyRequest) -> ImagesToClassify:
    """The body, read (in `room`), parsed and checked; a request refused here still counts once against the limit,
    unless it was never admitted (no room for its body, a body that is not HTTP, a server shutting down)."""
    try:
        with not_waiting_for_the_database():
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s, room,
                                   request.app.state.shutdown)
        started = time.perf_counter()
        to_classify = await parse_body(request.app.state.decode_pool, body, request.headers.get("content-type", ""),
                                       schema)
        add_timing(request, "parse", started)
        request.state.images = len(to_classify.sources)  # for the request log's row and /v1/usage
        check_image_count(len(to_classify.sources), key, settings)
    except ShuttingDown:
        raise shutting_down() from None  # not the client's doing: not counted
    except NotAdmitted:
        raise
    except (ApiError, RequestValidationError):
        await charge(request, key, limiter, 1)
        raise
    return to_classify


async def run_images(request: Request, key: ApiKey,
                     schema: type[ImagesRequest]) -> tuple[ImagesToClassify, list[Answer]]:
    """What /v1/classify and /v1/embeddings share: refusals that need no body, the body, the limit (each image
    counts one), decoding, and the forward pass that gives both outputs."""
    # Read here, not as dependencies: each one FastAPI solves costs the request CPU.
    state = request.app.state
    settings: Settings = state.settings
    limiter: SlidingWindowLimiter = state.limiter
    batcher: Batcher = state.batcher
    model: LoadedModel = state.model
    deadline = time.monotonic() + settings.request_timeout_s
    request.state.model_version = model.version  # for the request log's row
    if request.app.state.shutdown.deadline is not None:
        raise shutting_down()  # a request that arrives after SIGTERM (on a connection already open) joins no queue
    idempotency_key = requested_key(request)
    # Refusals that need no body, so none is read: a window this server saw full (unless the request's key has
    # a stored answer, which is replayed uncharged: one indexed read), a queue with no room at all.
    known_full = limiter.known_full(key.id, key.rate_limit, key.window_s)
    if known_full is not None and (idempotency_key is None or
                                   not await has_stored_answer(state.engine, key.id, idempotency_key)):
        refuse_if_full(request, key, known_full)
    if not batcher.has_room():
        raise overloaded(settings.max_queue)
    with state.body_memory.reserving() as room:
        to_classify = await read_classify_request(request, key, settings, limiter, room, schema)
        claim = await claim_for(request, key.id, to_classify.sources, to_classify.asked(), idempotency_key)
        try:
            # Queue places are taken as the admission records its hits, in one step: a full server does not use up
            # the limit, and a request waiting for the database's lock holds no place meanwhile.
            with batcher.reservation() as take_places:
                await charge(request, key, limiter, len(to_classify.sources), on_admit=take_places, claim=claim)
                with not_waiting_for_the_database():
                    started = time.perf_counter()
                    with batcher.images_coming(len(to_classify.sources)):
                        images = await decode_images(request.app.state.decode_pool, to_classify, model.spec,
                                                     settings.max_image_pixels)
                        add_timing(request, "decode", started)
                        inference = batcher.infer(images, deadline)
                    # Decoded: the base64 text is not needed again, and would be held while the images wait.
                    to_classify.sources.clear()
                    room.release()
                    answers = await infer(request, inference)
        except Overloaded:
            raise overloaded(settings.max_queue) from None
    request.state.timings["queue"] = max(answer.queue_ms for answer in answers)
    request.state.timings["model"] = max(answer.model_ms for answer in answers)
    request.state.model_name = model.spec.name  # for the request's line in the server log
    request.state.batch_size = max(answer.batch_size for answer in answers)
    return to_classify, answers
