"""The image-classification API: the app, its start-up, and its routes.

    $ .venv/bin/python main.py --host 127.0.0.1 --port 8000     # uvicorn main:app, as many workers as serve most
    $ (printf '{"image": "'; base64 -w0 "$IMG"; printf '"}') | curl -s localhost:8000/v1/classify -H "Authorization: Bearer $KEY" -d @-

Start-up loads the model (and warms it) and migrates the database to the schema's head; until that is done
the port is not open. A setting it cannot run with stops it with one line saying which (operations/configuration_errors.py).
"""

import asyncio
import base64
import gc
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError

from operations import metrics  # first: it decides where every metric below keeps its numbers

# isort: split
from db import ForeignSchemaError, RequestLog, make_engine, migrate, ping, waiting_until
from edge import api_docs
from edge.image_requests import run_images
from edge.request_body import BodyMemory, return_freed_bodies_to_the_system
from edge.schemas import (Classification, ClassifyRequest, Embedding, Embeddings, EmbeddingsRequest, Health,
                          ImageResult, ModelInfo, ModelList, MultiClassification, Preprocessing)
from edge.security_headers import SecurityHeadersMiddleware
from edge.serving import adopt_running_server, serve_on_the_fast_layout
from edge.uploads import EMBEDDINGS_MULTIPART_SCHEMA, MULTIPART_SCHEMA
from engine.backends import load_backend
from engine.batching import Batcher
from engine.runtimes import is_torch_loaded
from inference import LoadedModel, top_predictions, unit_vectors
from ledger import rollups
from ledger.backfill import backfill_in_background
from ledger.database_file import DatabaseFile
from ledger.idempotency import (HEADER as IDEMPOTENCY_HEADER, REPLAYED_HEADER, IdempotencyMiddleware, Replayed,
                                prune_expired, replay)
from ledger.keys import CurrentKey, KeyCache
from ledger.ratelimit import RedisWindowStorage, SlidingWindowLimiter, SqlWindowStorage, WindowStorage, make_redis
from ledger.reader import DatabaseReader
from ledger.request_log import RequestLogMiddleware
from ledger.retention import prune_forever
from ledger.usage import MAX_UNIX_TIME_S, Usage, read_usage
from ledger.writer import DatabaseWriter
from operations.configuration_errors import StartupFailure, check_sqlite_file, settings_or_exit, unusable_database
from operations.errors import ApiError, ErrorResponse, install_error_handlers
from operations.logs import configure_logging
from operations.request_ids import HEADER as REQUEST_ID_HEADER, RequestIdMiddleware
from operations.shutdown import Shutdown, chain_termination_handlers
from operations.threads import name_model_pool, name_os_thread, start_every_thread, start_model_thread
from settings import Settings, usable_cores

logger = logging.getLogger("classify")

STATIC = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere; the browser is told so, and enforces it.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'"}
# What a browser script on an allowed origin (CORS_ORIGINS) may send, and read of the answers.
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", REQUEST_ID_HEADER, IDEMPOTENCY_HEADER]
CORS_EXPOSED_HEADERS = ["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit",
                        "RateLimit-Policy", "Retry-After", REQUEST_ID_HEADER, "Server-Timing", REPLAYED_HEADER]

# One series, value 1, whose labels say what answers: the Prometheus idiom for build and version info.
MODEL_INFO = metrics.Gauge("model_info", "The model this server runs.",
                           ["model", "version", "backend", "precision", "weights_source"], multiprocess_mode="max")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Before any connection is accepted: however uvicorn was started, its connections get the limits of
    # edge/protocol.py.
    if not adopt_running_server(settings):
        logger.warning("not started by uvicorn: the connection limits (MAX_CONNECTIONS, HEADER_TIMEOUT_S, "
                       "SEND_TIMEOUT_S, the 16 KiB request head) are not enforced; start it with `uvicorn main:app`")
    engine = make_engine(settings.database_url, settings.db_timeout_s, settings.db_pool_size, settings.db_max_overflow)
    redis = make_redis(settings.redis_url, settings.db_timeout_s) if settings.redis_url else None
    loop = asyncio.get_running_loop()
    # The model is loaded and run on these threads (one per batch at once), so the runtime's own threads inherit
    # their lower priority.
    model_threads = ThreadPoolExecutor(max_workers=settings.parallel_batches, thread_name_prefix="model",
                                       initializer=start_model_thread)
    try:
        try:
            check_sqlite_file(settings.database_url)
            await migrate(engine)
        except (OperationalError, ForeignSchemaError) as exc:
            raise unusable_database(settings.database_url, exc) from None
        # ModelLoadError is a ConfigurationError: StartupFailure logs its one line.
        model, backend = await loop.run_in_executor(model_threads, load_backend, settings)
        await loop.run_in_executor(model_threads, name_model_pool)
        # torch runs one pass at a time: its threads are the process's
        parallel_batches = settings.parallel_batches if backend.name == "onnxruntime" else 1
        await start_every_thread(model_threads, parallel_batches)
    except BaseException:
        # Start-up failed (StartupFailure says why, in one line for a setting): nothing started may outlive it.
        model_threads.shutdown(wait=False)
        await engine.dispose()
        if redis is not None:
            await redis.aclose()
        raise
    max_batch = model.batch_limit(settings.max_batch)
    batcher = Batcher(backend, max_batch, settings.batch_wait_ms, settings.max_queue, model_threads, parallel_batches)
    batcher.start()
    MODEL_INFO.labels(model.spec.name, model.version, backend.name, backend.precision, model.weights_source).set(1)

    shutdown = Shutdown()

    def begin_shutdown(is_now: bool) -> None:
        """`is_now`: a second Ctrl-C; what is still arriving or queued is answered at once."""
        timeout_s = 0 if is_now else settings.shutdown_timeout_s
        deadline = time.monotonic() + timeout_s
        if shutdown.cut_to(deadline):
            batcher.stop_by(deadline)
            logger.info("shutting down: admitted requests have %g s%s", timeout_s,
                        " (a second Ctrl-C)" if is_now else " (SHUTDOWN_TIMEOUT_S)")

    app.state.shutdown = shutdown
    chain_termination_handlers(begin_shutdown)
    # Decoding is CPU work: more threads than cores would add memory (a decoded image each), not speed.
    decode_pool = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="decode",
                                     initializer=name_os_thread)
    # The request path's writes (admissions, log rows and their rollups) go through one thread, in groups;
    # /v1/usage reads in threads of its own, one hand-off a read; the other reads use the engine.
    writer = DatabaseWriter(settings.database_url, settings.db_timeout_s, {RequestLog: rollups.add_rows})
    writer.start()
    reader = DatabaseReader(settings.database_url, settings.db_timeout_s)

    def reconnect_to_new_file() -> None:
        writer.reconnect()
        reader.reconnect()

    app.state.engine = engine
    app.state.database_writer = writer
    app.state.database_reader = reader
    app.state.database_file = DatabaseFile(engine, on_replaced=reconnect_to_new_file)
    app.state.decode_pool = decode_pool
    app.state.body_memory = BodyMemory(settings.max_body_memory_bytes)
    if backend.name == "onnxruntime":
        # Not under torch: its activations are allocated anew each pass, and mapping each apart cost a ResNet-18
        # batch of 8 a third more CPU (ONNX Runtime keeps its own arena, unchanged).
        return_freed_bodies_to_the_system()
    app.state.redis = redis
    storage: WindowStorage = (RedisWindowStorage(redis, settings.redis_key_prefix, writer) if redis
                              else SqlWindowStorage(writer))
    app.state.limiter = SlidingWindowLimiter(storage)
    app.state.key_cache = KeyCache(settings.key_cache_ttl_s)
    app.state.model = model
    app.state.batcher = batcher
    app.description = describe_api(model, settings)  # /docs and /openapi.json are made later, on their first request
    logger.info("ready: %s version %s (weights: %s) on %s %s (torch %s), %d threads, %d at once, batches of up to "
                "%d, database %s, rate limit in %s", model.spec.name, model.version, model.weights_source,
                backend.name, backend.precision, "loaded" if is_torch_loaded() else "not loaded",
                settings.inference_threads, parallel_batches, max_batch,
                engine.url.render_as_string(hide_password=True), "Redis" if redis else "the database")
    # What start-up made lives as long as the process: frozen, it is no longer walked by every full collection of
    # the garbage collector (measured: /v1/usage's 2,160-bucket answer p99 111 -> 44 ms, p50 unchanged).
    gc.freeze()
    # Old rows (ledger/retention.py) and expired idempotency keys deleted, and a log older than the rollups counted into
    # them (ledger/backfill.py), in small batches as the database thread's jobs.
    background_jobs = [asyncio.create_task(prune_forever(writer, settings)),
                       asyncio.create_task(prune_expired(writer, settings.idempotency_ttl_s)),
                       asyncio.create_task(backfill_in_background(writer, settings.usage_retention_days))]
    try:
        yield
    finally:
        for job in background_jobs:
            job.cancel()
            with suppress(asyncio.CancelledError):
                await job
        await batcher.stop()
        model_threads.shutdown(wait=True)
        decode_pool.shutdown(wait=True)
        await writer.stop()
        await asyncio.to_thread(reader.stop)
        await engine.dispose()
        if redis is not None:
            await redis.aclose()
        metrics.process_stopped()


def describe_api(model: LoadedModel, settings: Settings) -> str:
    """The API's description in /docs: what this server's model labels images with."""
    # Not the labels themselves: they are the user's text, and this is read as Markdown.
    labels = ("ImageNet's 1000 labels" if settings.model_labels is None
              else f"{len(model.spec.labels)} labels of its own (GET /v1/models lists them)")
    return (f"Labels for your images from {model.spec.name}, {labels}: POST a base64 image to /v1/classify with a "
            "Bearer key.")


# async, as every dependency here: FastAPI runs a plain `def` one in its thread pool, a hop for each request.
async def get_model(request: Request) -> LoadedModel:
    return request.app.state.model


async def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


async def get_limiter(request: Request) -> SlidingWindowLimiter:
    return request.app.state.limiter


ModelDep = Annotated[LoadedModel, Depends(get_model)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
LimiterDep = Annotated[SlidingWindowLimiter, Depends(get_limiter)]


ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "The image cannot be used (not base64, not an image, corrupt), the query is inconsistent, or the "
         "Idempotency-Key is not 1 to 255 printable ASCII characters.",
    401: "No API key, or one that is malformed, unknown or revoked.",
    408: "The body did not arrive within BODY_TIMEOUT_S.",
    409: "A request with this Idempotency-Key is still being processed; Retry-After says when to ask again.",
    413: "The body is over MAX_BODY_BYTES or the image over MAX_IMAGE_PIXELS.",
    415: "The body is neither JSON nor multipart/form-data.",
    422: "A field is missing or has the wrong type or range, there are too many images, or the Idempotency-Key "
         "came with another request.",
    429: "The key's rate limit is reached; Retry-After says when to retry.",
    500: "A bug: the server failed unexpectedly. The body has the usual error shape.",
    503: "The server is at capacity (MAX_QUEUE), shutting down, or the database or Redis is unavailable; "
         "Retry-After says when to retry.",
    504: "The request waited for the model longer than REQUEST_TIMEOUT_S.",
}.items()}

router = APIRouter()


@router.post("/v1/classify", response_model=Classification | MultiClassification, tags=["classify"],
             responses={s: ERRORS[s] for s in (400, 401, 408, 409, 413, 415, 422, 429, 500, 503, 504)},
             # The body is read by hand, after the key is checked, so it is declared here.
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": ClassifyRequest.model_json_schema()},
                 "multipart/form-data": {"schema": MULTIPART_SCHEMA}}}})
async def classify(request: Request, response: Response, key: CurrentKey) -> Classification | MultiClassification:
    """Classify images: each one's `top_k` most likely labels (ImageNet's, or the model's own), most likely first,
    without those under `min_confidence`.

    Send `{"image": "<base64>", "top_k": 5}`, or `{"images": ["<base64>", ...]}` for several, or
    multipart/form-data with the file in a `file` part and optional `top_k` and `min_confidence` parts, with
    `Authorization: Bearer <key>`. Each image counts one request against the key's rate limit (all or none are
    admitted), even if one then turns out corrupt; a request whose body is refused counts one. Answers carry
    the rate-limit headers. With an `Idempotency-Key` header, a repeat gets the stored 200 answer, uncounted,
    with `Idempotent-Replayed: true`.
    """
    to_classify, answers = await run_images(request, key, ClassifyRequest)
    model: LoadedModel = request.app.state.model
    response.headers.update(request.state.rate_limit_headers)
    results = [ImageResult(predictions=top_predictions(answer.probabilities, model.spec.labels, to_classify.top_k,
                                                       to_classify.min_confidence),
                           inference_ms=round(answer.model_ms, 2), batch_size=answer.batch_size) for answer in answers]
    response_id = f"clf_{uuid.uuid4().hex}"
    if to_classify.is_list:
        return MultiClassification(id=response_id, model=model.spec.name, model_version=model.version, results=results)
    return Classification(id=response_id, model=model.spec.name, model_version=model.version,
                          **results[0].model_dump())


@router.post("/v1/embeddings", response_model=Embeddings, tags=["embeddings"],
             responses={s: ERRORS[s] for s in (400, 401, 408, 409, 413, 415, 422, 429, 500, 503, 504)},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": EmbeddingsRequest.model_json_schema()},
                 "multipart/form-data": {"schema": EMBEDDINGS_MULTIPART_SCHEMA}}}})
async def embeddings(request: Request, response: Response, key: CurrentKey) -> Embeddings:
    """Embed images: each one's vector (the input of the model's final classification layer), of length 1.

    The same bodies as /v1/classify, with `encoding_format` (`float` or `base64`) instead of `top_k`; the same
    forward pass, limits, batching and errors. Near images have a dot product near 1.
    """
    model: LoadedModel = request.app.state.model
    if model.embedding_dimensions is None:
        request.state.model_version = model.version
        fix = ("its operator must name the ONNX graph's embedding output with MODEL_EMBEDDING_OUTPUT"
               if model.is_onnx_file else "its final layer is not a linear layer whose input could be one")
        raise ApiError(400, "embeddings_unavailable", f"This server's model ({model.spec.name}) gives no "
                                                      f"embeddings: {fix}.")
    to_embed, answers = await run_images(request, key, EmbeddingsRequest)
    response.headers.update(request.state.rate_limit_headers)
    vectors = unit_vectors(np.stack([answer.embedding for answer in answers]))  # (B, D)
    if to_embed.encoding_format == "base64":
        encoded: list[list[float] | str] = [base64.b64encode(vector.astype("<f4").tobytes()).decode()
                                            for vector in vectors]
    else:
        encoded = vectors.tolist()
    return Embeddings(id=f"emb_{uuid.uuid4().hex}", model=model.spec.name, model_version=model.version,
                      dimensions=model.embedding_dimensions,
                      data=[Embedding(index=index, embedding=vector) for index, vector in enumerate(encoded)])


@router.get("/", include_in_schema=False)
async def home() -> FileResponse:
    """The web page for trying the model in a browser: static/index.html, its script and style beside it."""
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


@router.get("/v1/usage", response_model=Usage, tags=["usage"], responses={s: ERRORS[s] for s in (400, 401, 422, 500, 503)})
async def usage(request: Request, key: CurrentKey, limiter: LimiterDep,
                start_time: Annotated[int | None, Query(ge=0, le=MAX_UNIX_TIME_S, description="Unix seconds, inclusive.")] = None,
                end_time: Annotated[int | None, Query(ge=0, le=MAX_UNIX_TIME_S, description="Unix seconds, exclusive.")] = None,
                bucket_width: Annotated[Literal["1m", "1h", "1d"] | None, Query(description="Per-bucket counts too; needs start_time.")] = None,
                endpoint: Annotated[Literal["classify", "embeddings"], Query(description="Whose requests: /v1/classify's or /v1/embeddings'.")] = "classify",
                ) -> Response:
    """This key's requests to /v1/classify (or /v1/embeddings) of all outcomes, success rate, latency, and
    rate-limit state (one limit for both)."""
    limit_state = await limiter.peek(key.id, key.rate_limit, key.window_s)
    return await read_usage(request.app.state.database_reader, key, limit_state, endpoint, start_time, end_time,
                            bucket_width, request.app.state.settings.usage_retention_days)


@router.get("/v1/models", response_model=ModelList, tags=["models"], responses={s: ERRORS[s] for s in (401, 500, 503)})
async def models(_: CurrentKey, model: ModelDep, batcher: BatcherDep) -> ModelList:
    """The model this server runs: version, labels (and their names), preprocessing, where its weights came from,
    what runs it."""
    return ModelList(data=[ModelInfo(id=model.spec.name, version=model.version, labels=len(model.spec.labels),
                                     label_names=list(model.spec.labels), input_size=model.spec.crop,
                                     preprocessing=Preprocessing(**model.spec.preprocessing()),
                                     embedding_dimensions=model.embedding_dimensions,
                                     weights_source=model.weights_source, fallback_reason=model.fallback_reason,
                                     backend=batcher.backend.name, precision=batcher.backend.precision,
                                     max_batch=batcher.max_batch)])


@router.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health, tags=["health"])
async def healthz() -> Health:
    """Liveness: the process answers. No key, no database."""
    return Health(status="ok")


READY_TIMEOUT_S = 2  # what /readyz waits for the database (and Redis) at most: probes time out soon after


async def check_dependency(check: Awaitable[object], message: str) -> None:
    """503 `not_ready` unless `check` succeeds in time; what failed goes to the log, `message` to the client."""
    try:
        # The database's own lock waits end by READY_TIMEOUT_S (waiting_until); this ends anything else.
        await asyncio.wait_for(check, timeout=READY_TIMEOUT_S + 0.5)
    except Exception as exc:  # whatever the failure, the answer is the same: not ready
        logger.warning("not ready: %s (%r)", message, exc)
        raise ApiError(503, "not_ready", message, {"Retry-After": "1"}) from None


@router.api_route("/readyz", methods=["GET", "HEAD"], response_model=Health, tags=["health"],
                  responses={503: ERRORS[503]})
async def readyz(request: Request) -> Health:
    """Readiness: the model's worker and the database thread run, and the database (and Redis, when the limiter
    uses it) answer."""
    if not request.app.state.batcher.is_running:
        raise ApiError(503, "not_ready", "The model's worker has stopped (the server log says why); restart the "
                                         "server.", {"Retry-After": "1"})
    if not request.app.state.database_writer.is_running:
        raise ApiError(503, "not_ready", "The database thread has stopped (the server log says why); restart the "
                                         "server.", {"Retry-After": "1"})
    if not await request.app.state.database_file.is_usable():
        raise ApiError(503, "not_ready", "The database file is missing.", {"Retry-After": "1"})
    with waiting_until(time.monotonic() + min(READY_TIMEOUT_S, request.app.state.settings.db_timeout_s)):
        await check_dependency(ping(request.app.state.engine), "The database cannot be written.")
    if request.app.state.redis is not None:
        await check_dependency(request.app.state.redis.ping(), "Redis, where the rate limit lives, is not reachable.")
    return Health(status="ready")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or settings_or_exit()  # an invalid setting: one line, not a traceback of this import
    configure_logging(settings.log_level, settings.log_format)
    app = FastAPI(title="Image classification API", version="1.0.0", lifespan=lifespan,
                  description="Labels for your images: POST a base64 image to /v1/classify with a Bearer key.",
                  docs_url=None, redoc_url=None)  # api_docs serves /docs, with nothing from a CDN
    app.state.settings = settings
    # Added innermost first: a request meets RequestIdMiddleware first, so every answer (404s, 500s) has an id;
    # then the request log, so the preflights CORSMiddleware answers by itself are recorded (the log gives its own
    # answers, a 503 for the log, the same CORS headers).
    cors_options = dict(allow_origins=settings.cors_origin_list, allow_methods=["GET", "POST"],
                        allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, **cors_options)
    # Inside the request log: a 200 is stored with its log row.
    app.add_middleware(IdempotencyMiddleware, max_stored_bytes=settings.idempotency_max_stored_bytes)
    app.add_middleware(RequestLogMiddleware, cors_options=cors_options if settings.cors_origin_list else None)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(StartupFailure)
    install_error_handlers(app)
    app.add_exception_handler(Replayed, replay)
    app.include_router(router)
    app.include_router(api_docs.router)
    if settings.metrics_enabled:
        app.include_router(metrics.router)
    app.mount("/static", StaticFiles(directory=STATIC, packages=[api_docs.STATIC_PACKAGE]), name="static")
    return app


app = create_app()

if __name__ == "__main__":
    serve_on_the_fast_layout(app.state.settings, sys.argv[1:])
