"""The image-classification API: the app, its start-up, and its routes.

    $ uvicorn main:app --host 127.0.0.1 --port 8000
    $ curl -s localhost:8000/v1/classify -H "Authorization: Bearer $KEY" -d '{"image": "'$(base64 -w0 cat.jpg)'"}'

Start-up loads the model (and warms it) and migrates the database to the schema's head; until that is done
the port is not open.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from auth import CurrentKey, KeyCache
from db import SessionDep, make_engine, make_sessionmaker, migrate, ping
from errors import ApiError, ErrorResponse, install_error_handlers
from images import decode_base64, decode_for_model
from inference import Classifier, ModelLoadError, ModelSpec, load_model, preprocess
from ratelimit import Decision, RedisWindowStorage, SlidingWindowLimiter, SqlWindowStorage, WindowStorage, make_redis
from schemas import MAX_UNIX_TIME_S, Classification, ClassifyRequest, Health, ModelInfo, ModelList, Usage
from requestlog import RequestLogMiddleware
from settings import Settings, usable_cores
from usage import read_usage

logger = logging.getLogger("classify")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = make_engine(settings.database_url, settings.db_timeout_s, settings.db_pool_size, settings.db_max_overflow)
    redis = make_redis(settings.redis_url, settings.db_timeout_s) if settings.redis_url else None
    try:
        await migrate(engine)
        model = await asyncio.to_thread(load_model, settings.model_name, settings.model_weights, settings.model_fallback)
    except ModelLoadError as exc:
        logger.critical("cannot start: %s", exc)
        await engine.dispose()
        raise
    cores, model_threads = usable_cores(), settings.model_workers * settings.threads_per_worker
    if model_threads > cores:
        logger.warning("MODEL_WORKERS x TORCH_THREADS = %d threads on %d cores: forward passes will fight over them",
                       model_threads, cores)
    classifier = Classifier(model, settings.model_workers, settings.threads_per_worker)
    await classifier.warm_up()
    # Decoding is CPU work: more threads than cores would add memory (a decoded image each), not speed.
    decode_pool = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="decode")
    app.state.engine = engine
    app.state.decode_pool = decode_pool
    app.state.sessions = make_sessionmaker(engine)
    app.state.redis = redis
    storage: WindowStorage = RedisWindowStorage(redis, settings.redis_key_prefix) if redis else SqlWindowStorage(engine)
    app.state.limiter = SlidingWindowLimiter(storage)
    app.state.key_cache = KeyCache(settings.key_cache_ttl_s)
    app.state.classifier = classifier
    logger.info("ready: %s (weights: %s), %d model workers x %d torch threads, database %s, rate limit in %s",
                model.spec.name, model.weights_source, settings.model_workers, settings.threads_per_worker,
                engine.url.render_as_string(hide_password=True), "Redis" if redis else "the database")
    try:
        yield
    finally:
        decode_pool.shutdown(wait=True)
        classifier.close()
        await engine.dispose()
        if redis is not None:
            await redis.aclose()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_classifier(request: Request) -> Classifier:
    return request.app.state.classifier


def get_limiter(request: Request) -> SlidingWindowLimiter:
    return request.app.state.limiter


SettingsDep = Annotated[Settings, Depends(get_settings)]
ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
LimiterDep = Annotated[SlidingWindowLimiter, Depends(get_limiter)]


def rate_limit_headers(decision: Decision, window_s: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_s),
        # draft-ietf-httpapi-ratelimit-headers: the policy, then where this client stands in it
        "RateLimit-Policy": f'"default";q={decision.limit};w={window_s}',
        "RateLimit": f'"default";r={decision.remaining};t={decision.reset_s}',
    }


async def admit(request: Request, response: Response, key: CurrentKey, limiter: LimiterDep) -> Decision:
    """One slot of the key's window, or a 429. Counts every admitted request, whatever happens to it next."""
    decision = await limiter.hit(key.id, key.rate_limit, key.window_s)
    headers = rate_limit_headers(decision, key.window_s)
    request.state.rate_limit_headers = headers  # error answers after admission carry them too
    if not decision.allowed:
        raise ApiError(429, "rate_limit_exceeded",
                       f"This key may make {key.rate_limit} requests per {key.window_s} s; "
                       f"retry in {decision.retry_after_s} s.", {"Retry-After": str(decision.retry_after_s)})
    response.headers.update(headers)
    return decision


Admitted = Annotated[Decision, Depends(admit)]


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to be too big (Content-Length, or while streaming) and
    with 408 if it has not all arrived within `timeout_s`."""
    too_large = ApiError(413, "body_too_large", f"The request body is over {max_bytes} bytes (MAX_BODY_BYTES); "
                                                "send a smaller or more compressed image.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        raise ApiError(415, "unsupported_media_type", 'Send JSON: {"image": "<base64>", "top_k": 5}.')
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise too_large
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"The body did not arrive within {timeout_s:g} s (BODY_TIMEOUT_S).") from None
    except ClientDisconnect:
        raise ApiError(499, "client_closed_request", "The client closed the connection before sending the body.") from None
    return bytes(body)


def parse_and_preprocess(body: bytes, spec: ModelSpec, max_image_pixels: int) -> tuple[ClassifyRequest, np.ndarray]:
    """JSON -> base64 -> image -> (3, 224, 224). Milliseconds per megabyte, so it runs off the event loop."""
    try:
        classify_request = ClassifyRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None
    image = decode_for_model(decode_base64(classify_request.image), max_image_pixels, spec.resize, spec.crop, spec.interpolation)
    return classify_request, preprocess(image, spec)


ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "The image cannot be used (not base64, not an image, corrupt), or the query is inconsistent.",
    401: "No API key, or one that is malformed, unknown or revoked.",
    408: "The body did not arrive within BODY_TIMEOUT_S.",
    413: "The body is over MAX_BODY_BYTES or the image over MAX_IMAGE_PIXELS.",
    415: "The body is multipart; send JSON.",
    422: "A field is missing or has the wrong type or range.",
    429: "The key's rate limit is reached; Retry-After says when to retry.",
    500: "A bug: the server failed unexpectedly. The body has the usual error shape.",
    503: "The database or Redis is unavailable; Retry-After says when to retry.",
}.items()}

router = APIRouter()


@router.post("/v1/classify", response_model=Classification, tags=["classify"],
             responses={s: ERRORS[s] for s in (400, 401, 408, 413, 415, 422, 429, 500, 503)},
             # The body is read by hand, after the key and the limit are checked, so it is declared here.
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
async def classify(request: Request, _: Admitted, settings: SettingsDep, classifier: ClassifierDep) -> Classification:
    """Classify one image: its `top_k` most likely ImageNet labels, most likely first.

    Send `{"image": "<base64>", "top_k": 5}` with `Authorization: Bearer <key>`. Every answer carries the key's
    rate-limit headers; each admitted request counts against the limit, including ones answered 4xx.
    """
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    classify_request, x = await asyncio.get_running_loop().run_in_executor(
        request.app.state.decode_pool, parse_and_preprocess, body, classifier.model.spec, settings.max_image_pixels)
    predictions, inference_ms = await classifier.classify(x, classify_request.top_k)
    return Classification(id=f"clf_{uuid.uuid4().hex}", model=classifier.model.spec.name,
                          predictions=predictions, inference_ms=round(inference_ms, 2))


@router.get("/v1/usage", response_model=Usage, tags=["usage"], responses={s: ERRORS[s] for s in (400, 401, 422, 500, 503)})
async def usage(key: CurrentKey, session: SessionDep, limiter: LimiterDep,
                start_time: Annotated[int | None, Query(ge=0, le=MAX_UNIX_TIME_S, description="Unix seconds, inclusive.")] = None,
                end_time: Annotated[int | None, Query(ge=0, le=MAX_UNIX_TIME_S, description="Unix seconds, exclusive.")] = None,
                bucket_width: Annotated[Literal["1m", "1h", "1d"] | None, Query(description="Per-bucket counts too; needs start_time.")] = None,
                ) -> Usage:
    """This key's /v1/classify requests (all outcomes), success rate, mean latency, and rate-limit state."""
    limit_state = await limiter.peek(key.id, key.rate_limit, key.window_s)
    return await read_usage(session, key, limit_state, start_time, end_time, bucket_width)


@router.get("/v1/models", response_model=ModelList, tags=["models"], responses={s: ERRORS[s] for s in (401, 500, 503)})
async def models(_: CurrentKey, classifier: ClassifierDep) -> ModelList:
    """The model this server runs, and where its weights came from."""
    model = classifier.model
    return ModelList(data=[ModelInfo(id=model.spec.name, labels=len(model.spec.labels), input_size=model.spec.crop,
                                     weights_source=model.weights_source, fallback_reason=model.fallback_reason)])


@router.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health, tags=["health"])
async def healthz() -> Health:
    """Liveness: the process answers. No key, no database."""
    return Health(status="ok")


@router.api_route("/readyz", methods=["GET", "HEAD"], response_model=Health, tags=["health"],
                  responses={503: ERRORS[503]})
async def readyz(request: Request) -> Health:
    """Readiness: the model is loaded, and the database (and Redis, when the limiter uses it) answer."""
    try:
        await asyncio.wait_for(ping(request.app.state.engine), timeout=2)
    except Exception as exc:
        logger.warning("not ready: database check failed: %r", exc)
        raise ApiError(503, "not_ready", "The database is not reachable.", {"Retry-After": "1"}) from None
    if request.app.state.redis is not None:
        try:
            await asyncio.wait_for(request.app.state.redis.ping(), timeout=2)
        except Exception as exc:
            logger.warning("not ready: Redis check failed: %r", exc)
            raise ApiError(503, "not_ready", "Redis, where the rate limit lives, is not reachable.",
                           {"Retry-After": "1"}) from None
    return Health(status="ready")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(title="Image classification API", version="1.0.0", lifespan=lifespan,
                  description="ImageNet labels for your images: POST a base64 image to /v1/classify with a Bearer key.")
    app.state.settings = settings
    app.add_middleware(RequestLogMiddleware)
    install_error_handlers(app)
    app.include_router(router)
    return app


app = create_app()
