"""A Python client and command line for the image-classification API, on httpx.

    >>> from client import Client
    >>> with Client("http://127.0.0.1:8000", "sk-...") as client:
    ...     client.classify("cat.jpg", top_k=3).predictions[0].label
    'tabby'

    $ export CLASSIFY_URL=http://127.0.0.1:8000 CLASSIFY_API_KEY=sk-...
    $ python client.py classify photos/ cat.jpg [--top-k 3] [--concurrency 4] [--json]
    $ python client.py --url http://127.0.0.1:8000 --key sk-... usage [--json]

`AsyncClient` has the same methods, awaited. Both retry a bounded number of times (`max_attempts`): after the
`Retry-After` seconds on 429 and 503, and with exponential backoff and jitter on connection errors, timeouts
and 502/503/504. Any other 4xx is the request's own fault and is raised at once.

Exceptions:

    ClientError                  anything this module raises, e.g. no API key given
    ├── ServerUnreachable        no answer: refused, reset or timed out, after the retries
    └── ResponseError            an error answer: .status_code, and .code and .message from its body
        ├── InvalidRequest       400, 404, 408, 413, 415, 422...: fix the request, as .message says
        ├── AuthenticationError  401: the key is missing, unknown or revoked
        ├── RateLimited          429 after the retries; .retry_after_s
        └── ServerError          5xx: 500 at once (a bug), 502/503/504 after the retries

The command line lives in client_cli.py (its exit codes are listed there); `python client.py` runs it.
"""

import asyncio
import base64
import email.utils
import itertools
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # seconds; a big image on a busy server takes a while
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 0.5  # the first wait after a connection error or a 502/503/504; doubles each time
DEFAULT_MAX_BACKOFF_S = 20.0
DEFAULT_MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer wait gets its error raised instead
DEFAULT_TOP_K = 5
RETRIED_STATUSES = {429, 502, 503, 504}
# Classifying is idempotent, so a request that may have reached the server is sent again too; at worst the
# key's window counts it twice.
RETRIED_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
Image = str | os.PathLike[str] | bytes


class ClientError(Exception):
    """Anything this module raises."""


class ServerUnreachable(ClientError):
    """No answer: the connection was refused, reset or timed out, after the retries."""


class ResponseError(ClientError):
    """An error answer, with its status and the `code` and `message` of the server's error body."""

    def __init__(self, status_code: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code, self.code, self.message, self.retry_after_s = status_code, code, message, retry_after_s


class InvalidRequest(ResponseError):
    """A 4xx other than 401 and 429: the request must change, as `.message` says."""


class AuthenticationError(ResponseError):
    """401: the key is missing, unknown or revoked."""


class RateLimited(ResponseError):
    """429 after the retries, or with a wait over max_retry_after_s: see `.retry_after_s`."""


class ServerError(ResponseError):
    """5xx: a server bug (500, not retried), or 502/503/504 after the retries."""


@dataclass(frozen=True)
class Prediction:
    label: str
    class_id: int
    confidence: float  # 0..1


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int
    reset_s: int  # until the oldest counted request leaves the window

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> "RateLimit | None":
        try:
            return cls(int(headers["X-RateLimit-Limit"]), int(headers["X-RateLimit-Remaining"]),
                       int(headers["X-RateLimit-Reset"]))
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class Classification:
    id: str
    model: str
    predictions: list[Prediction]  # most likely first
    inference_ms: float
    rate_limit: RateLimit | None

    @classmethod
    def from_response(cls, response: httpx.Response) -> "Classification":
        with unexpected_answer(response):
            body = response.json()
            return cls(body["id"], body["model"], [Prediction(**p) for p in body["predictions"]],
                       body["inference_ms"], RateLimit.from_headers(response.headers))


@dataclass(frozen=True)
class Usage:
    key_prefix: str
    total_requests: int
    successful_requests: int
    success_rate: float  # percent
    avg_response_time_ms: float
    limit: int
    window_seconds: int
    remaining: int
    reset_seconds: int

    @classmethod
    def from_response(cls, response: httpx.Response) -> "Usage":
        with unexpected_answer(response):
            body = response.json()
            return cls(**{field.name: body[field.name] for field in fields(cls)})  # newer servers may add fields


@contextmanager
def unexpected_answer(response: httpx.Response) -> Iterator[None]:
    """A 200 that is not this API's answer (a wrong URL, a proxy's page) is a ServerError, not a traceback."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(response.status_code, "unexpected_answer",
                          f"the answer is not this API's ({type(exc).__name__}: {exc}); check the URL") from None


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
        asked = retry_after_s(outcome.headers.get("Retry-After")) if outcome.status_code in (429, 503) else None
        if asked is not None:
            # A little jitter, so that clients told the same second do not all come back at once.
            return None if asked > retries.max_retry_after_s else asked + jitter * retries.backoff_s
    elif not isinstance(outcome, RETRIED_ERRORS):
        return None
    ceiling = min(retries.max_backoff_s, retries.backoff_s * 2 ** (attempt - 1))
    return ceiling * (0.5 + jitter / 2)  # "equal jitter": spread out, yet never much shorter than planned


def checked(outcome: httpx.Response | Exception, url: str, attempts: int) -> httpx.Response:
    """The response if it is a success; otherwise the exception of the tree above that says what went wrong."""
    if isinstance(outcome, Exception):
        if isinstance(outcome, RETRIED_ERRORS):
            reason = str(outcome) or type(outcome).__name__
            raise ServerUnreachable(f"Cannot reach {url} ({reason}; {attempts} attempts). Is the server running?")
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


def upload(name: str, data: bytes, top_k: int) -> dict[str, Any]:
    return {"files": {"file": (name, data)}, "data": {"top_k": str(top_k)}}


def settings(url: str | None, key: str | None) -> tuple[str, dict[str, str]]:
    """The base URL and headers, from the arguments or CLASSIFY_URL / CLASSIFY_API_KEY."""
    key = key or os.environ.get("CLASSIFY_API_KEY")
    if not key:
        raise ClientError("No API key: pass one, or set CLASSIFY_API_KEY (`python cli.py create-key` makes one).")
    url = (url or os.environ.get("CLASSIFY_URL") or DEFAULT_URL).rstrip("/")
    return url, {"Authorization": f"Bearer {key}", "User-Agent": "classify-client/1.0"}


class Client:
    """The API over one connection pool: `with Client(url, key) as client: client.classify("cat.jpg")`."""

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 retries: Retries = Retries()) -> None:
        self.url, headers = settings(url, key)
        self.retries = retries
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def classify(self, image: Image, top_k: int = DEFAULT_TOP_K) -> Classification:
        """The `top_k` most likely labels of an image file (a path) or of an image's bytes."""
        return Classification.from_response(self._request("POST", "/v1/classify", **upload(*read_image(image), top_k)))

    def usage(self) -> Usage:
        """This key's request counts and where it stands in its rate limit."""
        return Usage.from_response(self._request("GET", "/v1/usage"))

    def embeddings(self, *images: Image) -> list[list[float]]:
        """Each image's embedding, of length 1 (a dot product of two is their cosine similarity), in order; as
        many images at once as the server's MAX_IMAGES_PER_REQUEST allows (16 by default)."""
        body = {"images": [base64.b64encode(read_image(image)[1]).decode() for image in images]}
        response = self._request("POST", "/v1/embeddings", json=body)
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
                return checked(outcome, self.url, attempt)
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

    async def classify(self, image: Image, top_k: int = DEFAULT_TOP_K) -> Classification:
        name, data = await asyncio.to_thread(read_image, image)
        return Classification.from_response(await self._request("POST", "/v1/classify", **upload(name, data, top_k)))

    async def usage(self) -> Usage:
        return Usage.from_response(await self._request("GET", "/v1/usage"))

    async def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        for attempt in itertools.count(1):
            try:
                outcome: httpx.Response | Exception = await self._http.request(method, path, **options)
            except httpx.TransportError as exc:
                outcome = exc
            wait_s = next_wait_s(self.retries, attempt, outcome, random.random())
            if wait_s is None:
                return checked(outcome, self.url, attempt)
            await asyncio.sleep(wait_s)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


if __name__ == "__main__":
    from client_cli import main

    sys.exit(main())
