"""What the image-classification API answers, as the client returns it: dataclasses for its bodies, and the
exceptions for its errors (the package's docstring draws their tree). Kept apart from the transport and its retry
rule (client.py), which change for other reasons; the package exports both, so `from client import ...` is all a
user writes.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

import httpx


class ClientError(Exception):
    """Anything this module raises."""


class ServerUnreachable(ClientError):
    """No answer: the connection was refused, reset or timed out, after the retries."""


class TimedOut(ServerUnreachable):
    """The server (or the way to it) did not answer within the timeout, after the retries."""


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
    batch_size: int  # images in the forward pass that answered this one
    rate_limit: RateLimit | None

    @classmethod
    def from_response(cls, response: httpx.Response) -> "Classification":
        with unexpected_answer(response):
            body = response.json()
            return cls(body["id"], body["model"], [Prediction(**p) for p in body["predictions"]],
                       body["inference_ms"], body["batch_size"], RateLimit.from_headers(response.headers))


@dataclass(frozen=True)
class ImageResult:
    predictions: list[Prediction]  # most likely first
    inference_ms: float
    batch_size: int


@dataclass(frozen=True)
class MultiClassification:
    id: str
    model: str
    results: list[ImageResult]  # one per image, in the order sent
    rate_limit: RateLimit | None

    @classmethod
    def from_response(cls, response: httpx.Response) -> "MultiClassification":
        with unexpected_answer(response):
            body = response.json()
            results = [ImageResult([Prediction(**p) for p in result["predictions"]], result["inference_ms"],
                                   result["batch_size"]) for result in body["results"]]
            return cls(body["id"], body["model"], results, RateLimit.from_headers(response.headers))


@dataclass(frozen=True)
class ModelInfo:
    id: str
    labels: int
    input_size: int
    weights_source: str  # file, cache, download or fallback package
    fallback_reason: str | None
    backend: str  # onnxruntime or torch
    precision: str  # fp32 or int8
    max_batch: int
    label_names: tuple[str, ...] = ()  # by class index (empty from a server of an earlier release)

    @classmethod
    def list_from_response(cls, response: httpx.Response) -> list["ModelInfo"]:
        with unexpected_answer(response):
            models = response.json()["data"]
            return [cls(**{field.name: model[field.name] if field.name != "label_names"
                           else tuple(model.get(field.name, ())) for field in fields(cls)}) for model in models]


@dataclass(frozen=True)
class ByStatus:
    succeeded: int  # 200
    client_errors: int  # 4xx but 429
    rate_limited: int  # 429
    server_errors: int  # 5xx


@dataclass(frozen=True)
class Latency:
    """Server time percentiles in ms, within 19 % of the exact ones; None when there were no requests."""
    p50: float | None
    p95: float | None
    p99: float | None


NO_STATUS = ByStatus(0, 0, 0, 0)
NO_LATENCY = Latency(None, None, None)


@dataclass(frozen=True)
class UsageBucket:
    start_time: int  # Unix seconds, inclusive
    end_time: int  # exclusive
    total_requests: int
    successful_requests: int
    images: int = 0  # what the rate limit charged
    by_status: ByStatus = NO_STATUS
    latency_ms: Latency = NO_LATENCY

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "UsageBucket":
        return cls(**known_fields(cls, body))


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
    start_time: int | None = None  # the range counted, if one was asked for (rounded out to whole minutes)
    end_time: int | None = None
    bucket_width: str | None = None
    buckets: list[UsageBucket] | None = None  # when bucket_width was given
    images: int = 0  # the images those requests carried: what the rate limit charged
    by_status: ByStatus = NO_STATUS
    latency_ms: Latency = NO_LATENCY
    covered_from: int | None = None  # Unix seconds: requests before it have passed the server's retention
    endpoint: str = "classify"  # whose requests: /v1/classify's or /v1/embeddings'

    @classmethod
    def from_response(cls, response: httpx.Response) -> "Usage":
        with unexpected_answer(response):
            usage = cls(**known_fields(cls, response.json()))
            if usage.buckets is None:
                return usage
            return replace(usage, buckets=[UsageBucket.from_json(bucket) for bucket in usage.buckets])


def known_fields(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    """Only the fields known here (newer servers may add some); a missing optional one keeps its default."""
    found = {field.name: body[field.name] for field in fields(cls) if field.name in body or field.default is MISSING}
    if isinstance(found.get("by_status"), dict):
        found["by_status"] = ByStatus(**known_fields(ByStatus, found["by_status"]))
    if isinstance(found.get("latency_ms"), dict):
        found["latency_ms"] = Latency(**known_fields(Latency, found["latency_ms"]))
    return found


@contextmanager
def unexpected_answer(response: httpx.Response) -> Iterator[None]:
    """A 200 that is not this API's answer (a wrong URL, a proxy's page) is a ServerError, not a traceback."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(response.status_code, "unexpected_answer",
                          f"the answer is not this API's ({type(exc).__name__}: {exc}); check the URL") from None
