"""Every setting of the server and the CLI, read once from the environment (or a .env file).

Each field's env var is its name in capitals: `MODEL_NAME=efficientnet_lite0`, `MAX_BODY_BYTES=1000000`.
Tests build their own `Settings(...)` or start a server with other env vars; nothing patches globals.
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ModelName = Literal["resnet18", "efficientnet_lite0"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore", protected_namespaces=())

    # Where keys, the request log and the rate-limit state live: sqlite:///path.db (relative to the cwd) or
    # postgresql+psycopg://user:password@host/dbname for several server processes on several hosts.
    database_url: str = "sqlite:///classify.db"
    # How long a database (or Redis) call may wait for a lock, a connection or a pooled connection before a 503.
    db_timeout_s: float = Field(10.0, gt=0)

    # The model that answers. resnet18 falls back to efficientnet_lite0 when its weights cannot be had.
    model_name: ModelName = "resnet18"
    # A ResNet-18 state_dict or training checkpoint on disk; tried before torchvision's cache and download.
    model_weights: Path | None = None
    # When false, missing ResNet-18 weights stop the server instead of switching to EfficientNet-Lite0.
    model_fallback: bool = True
    # Forward passes that may run at once, each with torch_threads threads; together never more than the cores.
    # One single-threaded pass per core beat one pass on all cores: on 2 cores, 8 clients, ResNet-18 did 28 req/s
    # against 21 (EfficientNet-Lite0: 31 against 19), because a multi-threaded pass waits for its slowest thread.
    model_workers: int = Field(default_factory=usable_cores, ge=1)
    torch_threads: int | None = Field(None, ge=1)  # default: cores // model_workers

    # Limits given to keys created without --rate-limit / --window.
    default_rate_limit: int = Field(60, ge=1)
    default_window_s: int = Field(60, ge=1)

    # Bodies above this get a 413 before they are read (base64 makes an image about 4/3 bigger).
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # A body still arriving after this long gets a 408: a slow sender cannot hold a slot forever.
    body_timeout_s: float = Field(30.0, gt=0)
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
    # How long a looked-up API key is trusted before it is read again: a revocation takes up to this long.
    key_cache_ttl_s: float = Field(5.0, ge=0)

    @field_validator("database_url")
    @classmethod
    def supported_database(cls, value: str) -> str:
        # The limiter locks per key in these two (SQLite's write lock, PostgreSQL's row lock); no others.
        if not value.startswith(("sqlite:", "sqlite+aiosqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError("DATABASE_URL must be sqlite:///path.db or postgresql+psycopg://user:password@host/dbname")
        return value

    @field_validator("redis_url")
    @classmethod
    def redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must be redis://host:6379/0 (rediss:// with TLS, unix:///path for a socket)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def threads_per_worker(self) -> int:
        return self.torch_threads or max(1, usable_cores() // self.model_workers)
