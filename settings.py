"""Every setting of the server and the CLI, read once from the environment (or a .env file).

Each field's env var is its name in capitals: `MODEL_NAME=efficientnet_lite0`, `MAX_BODY_BYTES=1000000`.
Tests build their own `Settings(...)` or start a server with other env vars; nothing patches globals.
"""

import importlib.util
import math
import os
import resource
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MAX_IMAGES = 256  # the most MAX_IMAGES_PER_REQUEST may be; the request's schema stops at it before validating each
BackendName = Literal["onnxruntime", "torch"]
Precision = Literal["fp32", "int8"]


# A worker at rest with ResNet-18 or EfficientNet-Lite0 on a cached graph: 175 to 270 MB (docs/benchmark.md)
WORKER_AT_REST_BYTES = 256 * 1024 * 1024


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")  # "hierarchy:controllers:path" lines; v2's controllers are ""


def cgroup_folders(controller: str, root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> list[Path]:
    """This process's cgroup folder for `controller` (cgroup v1 or v2) and each above it: a limit set on any applies."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:  # not on Linux
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers and controller not in controllers.split(","):
            continue
        mount = root / controllers if controllers else root  # v1: a tree per controller (cpu,cpuacct); v2: one
        folder = mount / path.lstrip("/")
        if not folder.is_dir():  # a container's own cgroup, mounted as the root, under the host's path
            folder = mount
        while folder.is_dir():
            folders.append(folder)
            if folder == mount:
                break
            folder = folder.parent
    return folders


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_quota_cores(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> float | None:
    """The cores' worth of time per period this process's cgroup allows (a container's --cpus); None: unbounded."""
    quotas = []
    for folder in cgroup_folders("cpu", root, membership):
        if (limit := read_text(folder / "cpu.max")) is not None:  # v2: "max 100000" or "150000 100000"
            quota, period = limit.split()
        elif (quota := read_text(folder / "cpu.cfs_quota_us")) is not None:  # v1: -1 when unbounded
            period = read_text(folder / "cpu.cfs_period_us") or "100000"
        else:
            continue
        if quota not in ("max", "-1"):
            quotas.append(int(quota) / int(period))
    return min(quotas, default=None)


def memory_limit_bytes(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> int:
    """The memory this process may use: the machine's, or its cgroup's limit (a container's --memory) if lower."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for folder in cgroup_folders("memory", root, membership):
        for name in ("memory.max", "memory.limit_in_bytes"):  # v2 ("max" when unbounded), v1
            if (limit := read_text(folder / name)) not in (None, "max"):
                limits.append(int(limit))
    return min(limits)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), fewer if its CPU quota allows less time, rounded up
    (as Go and the JVM do); not the machine's count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota_cores()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def fast_layout_workers(body_memory_bytes: int = 256 * 1024 * 1024) -> int:
    """The server processes that serve most on the cores and memory this process may use: one per core (each then
    runs its passes on one thread), as many as fit in the memory at WORKER_AT_REST_BYTES and the uploads it may
    hold (MAX_BODY_MEMORY_BYTES) each (docs/production.md). A bigger model needs WEB_CONCURRENCY set."""
    return max(1, min(usable_cores(), memory_limit_bytes() // (WORKER_AT_REST_BYTES + body_memory_bytes)))


def default_max_connections() -> int:
    """1000, or half the files this process may open (`ulimit -n`) when that is lower: the rest are for the
    database, the model, the logs."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1000 if soft_limit == resource.RLIM_INFINITY else max(1, min(1000, soft_limit // 2))


def cores_per_worker(workers: int) -> int:
    """One server process's share of the cores it may run on, when `workers` processes share them."""
    return max(1, usable_cores() // workers)


def is_number(text: object) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def default_backend() -> BackendName:
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"


class Settings(BaseSettings):
    # hide_input_in_errors: a refused DATABASE_URL or REDIS_URL must not print its password in the error.
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore", protected_namespaces=(),
                                      hide_input_in_errors=True)

    # Where keys, the request log and the rate-limit state live: sqlite:///path.db (relative to the cwd) or
    # postgresql+psycopg://user:password@host/dbname for several server processes on several hosts.
    database_url: str = "sqlite:///classify.db"
    # How long a request may wait for the database in all (locks, connections), and a Redis call, before a 503.
    db_timeout_s: float = Field(10.0, gt=0)

    # The model that answers: any torchvision classification architecture (resnet50, mobilenet_v3_small, vit_b_16...)
    # or efficientnet_lite0; checked at start-up, which lists the valid names. Falls back to efficientnet_lite0
    # when the architecture's weights cannot be had.
    model_name: str = "resnet18"
    # MODEL_NAME's weights on disk (state_dict or training checkpoint), tried before torchvision's cache and download;
    # the final layer may have any number of classes.
    model_weights: Path | None = None
    # The classes' names: one per line, a JSON list, or a JSON object from index to label. Default: ImageNet's 1000.
    model_labels: Path | None = None
    # When false, torchvision weights that cannot be had stop the server instead of switching to EfficientNet-Lite0.
    model_fallback: bool = True
    # An ONNX classifier trained anywhere, served instead of MODEL_NAME: float32 (B, 3, H, W) in, (B, N) out.
    model_onnx: Path | None = None
    # The preprocessing: the shorter side scaled to MODEL_RESIZE, the centre MODEL_CROP square taken, then
    # (pixel / 255 - mean) / std per channel (RGB). MODEL_ONNX's, defaults included; for MODEL_NAME, those set
    # replace the architecture's own (its training transforms: inference.with_preprocessing).
    model_resize: int = Field(256, ge=1, le=4096)
    model_crop: int = Field(224, ge=1, le=4096)
    model_mean: Annotated[tuple[float, float, float], NoDecode] = (0.485, 0.456, 0.406)
    model_std: Annotated[tuple[float, float, float], NoDecode] = (0.229, 0.224, 0.225)
    model_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # What MODEL_ONNX's class output holds: logits (the server applies softmax) or probabilities; checked on photos.
    model_output: Literal["logits", "probabilities"] = "logits"
    # The MODEL_ONNX output that /v1/embeddings answers with (e.g. the pooled features before the last layer).
    model_embedding_output: str | None = None
    # What answers call the model; by default MODEL_NAME, or MODEL_ONNX's file name (its folder's, for model.onnx).
    model_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    # Named in every answer; by default 12 hex digits of a SHA-256 of the weights (or ONNX) file, its external data
    # and MODEL_LABELS' labels, and -int8 for int8 (inference.default_version).
    model_version: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    # Where the forward pass runs; onnxruntime (the default when installed) runs a graph exported from the weights.
    inference_backend: BackendName = Field(default_factory=default_backend)
    # int8 (ONNX Runtime only): statically quantized, faster, and not quite the same answers (see docs/engine.md).
    inference_precision: Precision = "fp32"
    # A folder of your own images (searched recursively) that int8's quantization is calibrated on: photos like
    # those the model will be sent. Default: the photos that ship with scikit-image.
    int8_calibration_dir: Path | None = None
    # Server processes on this machine's cores: uvicorn starts this many workers when --workers is not given, and
    # each reads it here to take its share of the cores (uvicorn never tells a worker how many there are).
    web_concurrency: int = Field(1, ge=1)
    # The model's threads: this process's share of the cores (all of them with one worker; N workers each with all
    # would make the cores' schedulers take turns between N pools).
    inference_threads: int = Field(default_factory=lambda data: cores_per_worker(data.get("web_concurrency", 1)), ge=1)
    # Forward passes run at once: inference_threads (the default), each on one thread, which keeps the cores
    # busiest under load (one pass's threads wait on each other); or 1, each pass on every thread, so a lone
    # request is answered soonest (see docs/engine.md). Nothing between: passes side by side share one session,
    # and with it its pool of threads. The torch backend runs one pass at a time.
    parallel_batches: int = Field(default_factory=lambda data: data.get("inference_threads", 1), ge=1)
    # Exported ONNX graphs, named by a hash of what they compute (weights, architecture, preprocessing), so a restart
    # serves them, without torch (engine/graph_cache.py).
    model_cache_dir: Path = Path.home() / ".cache" / "classify"
    # A forward pass takes up to max_batch waiting images, and waits up to batch_wait_ms for more once it has one,
    # while more are being decoded
    # (2 ms: with 8 clients, 0 or 5 ms changed neither the model's CPU per image nor the requests answered).
    max_batch: int = Field(8, ge=1, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    # Images accepted and not yet answered; beyond this /v1/classify answers 503 at once instead of queueing.
    max_queue: int = Field(64, ge=1)
    # A request still waiting for the model this long after it arrived is dropped and answered 504.
    request_timeout_s: float = Field(30.0, gt=0)
    # Images in one {"images": [...]} request; each counts one against the rate limit.
    max_images_per_request: int = Field(16, ge=1, le=MAX_IMAGES)

    # Limits given to keys created without --rate-limit / --window.
    default_rate_limit: int = Field(60, ge=1)
    default_window_s: int = Field(60, ge=1)

    # Bodies above this get a 413 before they are read (base64 makes an image about 4/3 bigger).
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # A body still arriving after this long gets a 408: a slow sender cannot hold a slot forever.
    body_timeout_s: float = Field(30.0, gt=0)
    # The memory request bodies may take at once, all requests together: a body counts three times its size (its
    # bytes, the text or file parsed from them, the parser's copy) from when it starts to arrive until its images
    # are decoded. Past it, a new upload is answered 503 before its body is read.
    max_body_memory_bytes: int = Field(256 * 1024 * 1024, ge=2048)
    # A request line and headers not all in this long after the connection opened (or its last answer ended)
    # get a 408 and the connection is closed; one that sent nothing is closed.
    header_timeout_s: float = Field(10.0, gt=0)
    # An answer the client reads none of for this long (its socket's buffers full) is abandoned, and the
    # connection aborted: a client that never reads cannot hold a connection, or the server's exit, for good.
    send_timeout_s: float = Field(30.0, gt=0)
    # Connections one server process holds at most; past it a new one is answered 503 and closed at once, before
    # connections use up its open files.
    max_connections: int = Field(default_factory=default_max_connections, ge=1)
    # Images whose header declares more pixels get a 413 before decoding (Pillow itself only warns at 89 MP).
    max_image_pixels: int = Field(25_000_000, ge=1)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # PostgreSQL connections each server process keeps open, and how many more it may open under bursts.
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    # With it (redis://host:6379/0) the rate limiter's windows live in Redis, shared by every server process.
    redis_url: str | None = None
    # Prepended to every Redis key, so several deployments can share one Redis.
    redis_key_prefix: str = "classify"
    # How long a 200 answer to a request with an Idempotency-Key is kept, and replayed to its repeats.
    idempotency_ttl_s: int = Field(86400, ge=1)
    # A 200 answer larger than this is sent but not stored for its Idempotency-Key (its repeat is processed again).
    idempotency_max_stored_bytes: int = Field(1024 * 1024, ge=0)
    # How long a looked-up API key is trusted before it is read again: a revocation takes up to this long.
    key_cache_ttl_s: float = Field(5.0, ge=0)
    # Request-log rows older than this many days are deleted, a small batch at a time (ledger/retention.py).
    request_log_retention_days: int = Field(30, ge=1)
    # Usage rollups are kept this long, so /v1/usage answers for a year after the raw rows are gone.
    usage_retention_days: int = Field(400, ge=1)

    # text: one readable line per record; json: one JSON object per line (operations/logs.py), for log collectors.
    log_format: Literal["text", "json"] = "text"
    # GET /metrics in Prometheus' text format; false makes it a 404.
    metrics_enabled: bool = True
    # After SIGTERM, admitted requests get this long to be answered; images still queued and bodies still
    # arriving then get a 503.
    shutdown_timeout_s: float = Field(20.0, gt=0)
    # Browser origins allowed to call the API, comma-separated (https://app.example.com); empty: none, no CORS headers.
    cors_origins: str = ""

    @field_validator("database_url")
    @classmethod
    def supported_database(cls, value: str) -> str:
        # The limiter locks per key in these two (SQLite's write lock, PostgreSQL's row lock); no others.
        if value.startswith("postgres://"):  # what Heroku and many hosts hand out: the same database
            value = "postgresql://" + value.removeprefix("postgres://")
        try:
            url = make_url(value)
        except ArgumentError:
            url = None
        if url is None or not value.startswith(("sqlite:", "sqlite+aiosqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError("DATABASE_URL must be sqlite:///path.db or postgresql+psycopg://user:password@host/dbname")
        if url.get_backend_name() == "sqlite" and (url.database in (None, "", ":memory:")
                                                    or url.database.startswith("file::memory:")):
            raise ValueError("an in-memory SQLite database lasts as long as its connection, and the server's "
                             "threads open their own: point DATABASE_URL at a file, such as sqlite:///classify.db")
        return value

    @field_validator("model_mean", "model_std", mode="before")
    @classmethod
    def comma_separated(cls, value: object, info: ValidationInfo) -> object:
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or len(parts) != 3 or not all(map(is_number, parts)):
            example = "0.485,0.456,0.406" if info.field_name == "model_mean" else "0.229,0.224,0.225"
            raise ValueError(f"{info.field_name.upper()} must be three numbers, one per channel (red, green, blue), "
                             f"comma-separated, e.g. {example}")
        return tuple(float(part) for part in parts)

    @field_validator("model_std")
    @classmethod
    def positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("MODEL_STD must be three positive numbers, one per channel (red, green, blue), "
                             "comma-separated, e.g. 0.229,0.224,0.225")
        return value

    @model_validator(mode="after")
    def crop_inside_resize(self) -> "Settings":
        # For MODEL_NAME one of them may be the architecture's own: inference.with_preprocessing checks those.
        is_both_known = self.model_onnx is not None or {"model_crop", "model_resize"} <= self.model_fields_set
        if is_both_known and self.model_crop > self.model_resize:
            raise ValueError(f"MODEL_CROP={self.model_crop} is over MODEL_RESIZE={self.model_resize}: the crop is "
                             "taken from the resized image; make MODEL_CROP at most MODEL_RESIZE")
        return self

    @model_validator(mode="after")
    def model_settings_that_apply(self) -> "Settings":
        """Every model setting given changes what is served: one that would be ignored stops the start instead."""
        if self.model_onnx is not None:
            ignored = {"model_name": "with MODEL_ONNX the file is the model (MODEL_ID names it in answers)",
                       "model_weights": "an ONNX file (MODEL_ONNX) holds its own weights",
                       "model_fallback": "an ONNX file (MODEL_ONNX) is never replaced by the fallback model"}
            if self.inference_backend == "torch":
                ignored["inference_backend"] = "an ONNX file (MODEL_ONNX) runs on ONNX Runtime only"
        else:
            ignored = {"model_output": "it describes MODEL_ONNX's output; MODEL_NAME's network gives logits, "
                                       "which the server turns into probabilities itself",
                       "model_embedding_output": "it names an output of MODEL_ONNX; MODEL_NAME's embedding is the "
                                                 "input of its final layer, which the server finds itself"}
            if self.model_weights is not None or self.model_name == "efficientnet_lite0":
                ignored["model_fallback"] = ("the fallback replaces only torchvision's weights when they cannot be "
                                             "had: MODEL_WEIGHTS is loaded or stops the start, and "
                                             "efficientnet_lite0's weights are always there")
        if self.int8_calibration_dir is not None and self.inference_precision != "int8":
            ignored["int8_calibration_dir"] = "only int8 is calibrated (INFERENCE_PRECISION=int8)"
        for name, reason in ignored.items():
            if name in self.model_fields_set:
                value = getattr(self, name)
                shown = str(value).lower() if isinstance(value, bool) else value
                raise ValueError(f"{name.upper()}={shown} would be ignored: {reason}; unset {name.upper()}")
        if self.inference_precision == "int8" and self.inference_backend == "torch":
            raise ValueError("INFERENCE_PRECISION=int8 cannot be served by INFERENCE_BACKEND=torch: int8 runs on "
                             "ONNX Runtime only; set INFERENCE_BACKEND=onnxruntime (pip install onnxruntime), or "
                             "unset INFERENCE_PRECISION")
        return self

    @model_validator(mode="after")
    def threads_for_each_batch(self) -> "Settings":
        if self.parallel_batches not in (1, self.inference_threads):
            raise ValueError(f"PARALLEL_BATCHES={self.parallel_batches} is neither 1 nor INFERENCE_THREADS="
                             f"{self.inference_threads}: passes side by side run on one thread each; make it 1 "
                             f"(one pass at a time, on every thread) or {self.inference_threads}")
        return self

    @property
    def threads_per_batch(self) -> int:
        return self.inference_threads // self.parallel_batches

    @field_validator("redis_url")
    @classmethod
    def redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must be redis://host:6379/0 (rediss:// with TLS, unix:///path for a socket)")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def lower_case_format(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip()]

    @field_validator("log_level", mode="before")
    @classmethod
    def upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def memory_holds_a_body(self) -> "Settings":
        if self.max_body_memory_bytes < 3 * self.max_body_bytes:
            raise ValueError(f"MAX_BODY_MEMORY_BYTES={self.max_body_memory_bytes} is below three times MAX_BODY_BYTES="
                             f"{self.max_body_bytes}: a body counts three times its size, so the largest would never "
                             "be read; raise MAX_BODY_MEMORY_BYTES or lower MAX_BODY_BYTES")
        return self

    @model_validator(mode="after")
    def queue_holds_a_request(self) -> "Settings":
        if self.max_queue < self.max_images_per_request:
            raise ValueError(f"MAX_QUEUE={self.max_queue} is below MAX_IMAGES_PER_REQUEST={self.max_images_per_request}"
                             ": the largest request would never fit; raise MAX_QUEUE or lower MAX_IMAGES_PER_REQUEST")
        return self
