"""`Client` and `AsyncClient`: the API's calls on httpx, with their retry rule (`Retries`); the package's docstring
shows them in use."""

import asyncio
import base64
import email.utils
import itertools
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from client.answers import (AuthenticationError, Classification, ClientError, InvalidRequest, ModelInfo,
                            MultiClassification, RateLimited, ServerError, ServerUnreachable, TimedOut, Usage,
                            unexpected_answer)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # seconds; a big image on a busy server takes a while
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 0.5  # the first wait after a connection error or a 502/503/504; doubles each time
DEFAULT_MAX_BACKOFF_S = 20.0
DEFAULT_MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer wait gets its error raised instead
DEFAULT_TOP_K = 5
RETRIED_STATUSES = {409, 429, 502, 503, 504}  # 409: the same Idempotency-Key's first request is still running
# A request that may have reached the server is sent again too, with its Idempotency-Key: the server answers
# it once, and counts it once.
RETRIED_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
Image = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class Retries:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date (RFC 9110); None if absent or unreadable."""
    if value is None:
        return None
    if value.strip().isascii() and value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def next_wait_s(retries: Retries, attempt: int, outcome: httpx.Response | Exception, jitter: float) -> float | None:
    """Seconds to wait before trying again after attempt number `attempt` ended in `outcome`, or None to stop
    there. `jitter` is a random number in [0, 1). Pure, so both clients share it and tests can call it."""
    if attempt >= retries.max_attempts:
        return None
    if isinstance(outcome, httpx.Response):
        if outcome.status_code not in RETRIED_STATUSES:
            return None
        asked = retry_after_s(outcome.headers.get("Retry-After")) if outcome.status_code in (409, 429, 503) else None
        if asked is not None:
            # A little jitter, so that clients told the same second do not all come back at once.
            return None if asked > retries.max_retry_after_s else asked + jitter * retries.backoff_s
    elif not isinstance(outcome, RETRIED_ERRORS):
        return None
    ceiling = min(retries.max_backoff_s, retries.backoff_s * 2 ** (attempt - 1))
    return ceiling * (0.5 + jitter / 2)  # "equal jitter": spread out, yet never much shorter than planned


def counted(number: int, noun: str) -> str:
    """`1 attempt`, `3 attempts`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def checked(outcome: httpx.Response | Exception, url: str, attempts: int, timeout: httpx.Timeout) -> httpx.Response:
    """The response if it is a success; otherwise the exception of the tree above that says what went wrong."""
    if isinstance(outcome, Exception):
        if isinstance(outcome, httpx.TimeoutException):
            waited_s = timeout.connect if isinstance(outcome, httpx.ConnectTimeout) else timeout.read
            raise TimedOut(f"No answer from {url} within {waited_s:g} s ({type(outcome).__name__}; "
                           f"{counted(attempts, 'attempt')}): the server may be busy, or the timeout too short.")
        if isinstance(outcome, RETRIED_ERRORS):
            reason = str(outcome) or type(outcome).__name__
            raise ServerUnreachable(f"Cannot reach {url} ({reason}; {counted(attempts, 'attempt')}). "
                                    "Is the server running?")
        raise ClientError(f"Cannot send the request to {url}: {outcome}") from outcome
    if outcome.is_success:
        return outcome
    try:
        error = outcome.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "unexpected_answer", outcome.text[:200] or outcome.reason_phrase
    status = outcome.status_code
    kind = {401: AuthenticationError, 429: RateLimited}.get(status, ServerError if status >= 500 else InvalidRequest)
    raise kind(status, code, message, retry_after_s(outcome.headers.get("Retry-After")))


def read_image(image: Image) -> tuple[str, bytes]:
    """(a file name for the upload, the bytes) of a path or of bytes already read."""
    if isinstance(image, bytes):
        return "image", image
    return Path(image).name, Path(image).read_bytes()


def options(top_k: int, min_confidence: float | None) -> dict[str, int | float]:
    """/v1/classify's options; `min_confidence` only when given, so servers from before it still answer."""
    return {"top_k": top_k} if min_confidence is None else {"top_k": top_k, "min_confidence": min_confidence}


def upload(name: str, data: bytes, top_k: int, min_confidence: float | None) -> dict[str, Any]:
    fields = {field: str(value) for field, value in options(top_k, min_confidence).items()}
    return {"files": {"file": (name, data)}, "data": fields}


def several(images: list[bytes], top_k: int, min_confidence: float | None) -> dict[str, Any]:
    """Several images go as one JSON body (a form carries one file): base64, as the API takes them."""
    return {"json": {"images": [base64.b64encode(data).decode() for data in images],
                     **options(top_k, min_confidence)}}


def idempotent(idempotency_key: str | None) -> dict[str, Any]:
    """The Idempotency-Key header for one call, sent unchanged with each of its retries."""
    return {"headers": {"Idempotency-Key": str(uuid.uuid4()) if idempotency_key is None else idempotency_key}}


def usage_query(start_time: float | None, end_time: float | None, bucket_width: str | None,
                endpoint: str) -> dict[str, Any]:
    """/v1/usage's range (Unix seconds, whole ones as the API takes them) and buckets (1m, 1h or 1d), if given,
    and whose requests (classify's are the server's default)."""
    query = {"start_time": start_time, "end_time": end_time, "bucket_width": bucket_width,
             "endpoint": None if endpoint == "classify" else endpoint}
    return {"params": {name: int(value) if isinstance(value, float) else value
                       for name, value in query.items() if value is not None}}


def settings(url: str | None, key: str | None) -> tuple[str, dict[str, str]]:
    """The base URL and headers, from the arguments or CLASSIFY_URL / CLASSIFY_API_KEY."""
    key = key or os.environ.get("CLASSIFY_API_KEY")
    if not key:
        raise ClientError("No API key: pass one, or set CLASSIFY_API_KEY (`python cli.py create-key` makes one).")
    url = (url or os.environ.get("CLASSIFY_URL") or DEFAULT_URL).rstrip("/")
    if "://" not in url:
        url = f"http://{url}"  # localhost:8000, as curl takes it
    return url, {"Authorization": f"Bearer {key}", "User-Agent": "classify-client/1.0"}


class Client:
    """The API over one connection pool: `with Client(url, key) as client: client.classify("cat.jpg")`."""

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 retries: Retries = Retries()) -> None:
        self.url, headers = settings(url, key)
        self.retries = retries
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def classify(self, image: Image, top_k: int = DEFAULT_TOP_K, *, min_confidence: float | None = None,
                 idempotency_key: str | None = None) -> Classification:
        """The `top_k` most likely labels of an image file (a path) or of an image's bytes; with `min_confidence`
        (0 to 1), only those at least that likely, so maybe fewer or none. `idempotency_key`: your own (1 to 255
        printable ASCII characters), to repeat the call later and get the same answer uncharged; a fresh one
        otherwise."""
        body = upload(*read_image(image), top_k, min_confidence)
        return Classification.from_response(self._request("POST", "/v1/classify", **body,
                                                          **idempotent(idempotency_key)))

    def classify_many(self, images: list[Image], top_k: int = DEFAULT_TOP_K, *, min_confidence: float | None = None,
                      idempotency_key: str | None = None) -> MultiClassification:
        """Several images in one request (each counts one against the limit): one result each, in order."""
        body = several([read_image(image)[1] for image in images], top_k, min_confidence)
        return MultiClassification.from_response(self._request("POST", "/v1/classify", **body,
                                                               **idempotent(idempotency_key)))

    def models(self) -> list[ModelInfo]:
        """The model the server runs, where its weights came from, and what runs it."""
        return ModelInfo.list_from_response(self._request("GET", "/v1/models"))

    def usage(self, start_time: float | None = None, end_time: float | None = None,
              bucket_width: str | None = None, endpoint: str = "classify") -> Usage:
        """This key's request counts to `endpoint` ("classify" or "embeddings"; in [start_time, end_time), Unix
        seconds, if given; per `bucket_width` bucket too: 1m, 1h or 1d) and where it stands in its rate limit."""
        query = usage_query(start_time, end_time, bucket_width, endpoint)
        return Usage.from_response(self._request("GET", "/v1/usage", **query))

    def embeddings(self, *images: Image, idempotency_key: str | None = None) -> list[list[float]]:
        """Each image's embedding, of length 1 (a dot product of two is their cosine similarity), in order; as
        many images at once as the server's MAX_IMAGES_PER_REQUEST allows (16 by default)."""
        body = {"images": [base64.b64encode(read_image(image)[1]).decode() for image in images]}
        response = self._request("POST", "/v1/embeddings", json=body, **idempotent(idempotency_key))
        with unexpected_answer(response):
            return [item["embedding"] for item in response.json()["data"]]

    def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        for attempt in itertools.count(1):
            try:
                outcome: httpx.Response | Exception = self._http.request(method, path, **options)
            except httpx.TransportError as exc:
                outcome = exc
            wait_s = next_wait_s(self.retries, attempt, outcome, random.random())
            if wait_s is None:
                return checked(outcome, self.url, attempt, self._http.timeout)
            time.sleep(wait_s)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """`Client`, for asyncio: `async with AsyncClient(url, key) as client: await client.classify("cat.jpg")`."""

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 retries: Retries = Retries()) -> None:
        self.url, headers = settings(url, key)
        self.retries = retries
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def classify(self, image: Image, top_k: int = DEFAULT_TOP_K, *, min_confidence: float | None = None,
                       idempotency_key: str | None = None) -> Classification:
        name, data = await asyncio.to_thread(read_image, image)
        body = upload(name, data, top_k, min_confidence)
        return Classification.from_response(await self._request("POST", "/v1/classify", **body,
                                                                **idempotent(idempotency_key)))

    async def classify_many(self, images: list[Image], top_k: int = DEFAULT_TOP_K, *,
                            min_confidence: float | None = None,
                            idempotency_key: str | None = None) -> MultiClassification:
        read = await asyncio.to_thread(lambda: [read_image(image)[1] for image in images])
        body = several(read, top_k, min_confidence)
        return MultiClassification.from_response(await self._request("POST", "/v1/classify", **body,
                                                                     **idempotent(idempotency_key)))

    async def models(self) -> list[ModelInfo]:
        return ModelInfo.list_from_response(await self._request("GET", "/v1/models"))

    async def usage(self, start_time: float | None = None, end_time: float | None = None,
                    bucket_width: str | None = None, endpoint: str = "classify") -> Usage:
        query = usage_query(start_time, end_time, bucket_width, endpoint)
        return Usage.from_response(await self._request("GET", "/v1/usage", **query))

    async def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        for attempt in itertools.count(1):
            try:
                outcome: httpx.Response | Exception = await self._http.request(method, path, **options)
            except httpx.TransportError as exc:
                outcome = exc
            wait_s = next_wait_s(self.retries, attempt, outcome, random.random())
            if wait_s is None:
                return checked(outcome, self.url, attempt, self._http.timeout)
            await asyncio.sleep(wait_s)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

