"""API keys: how they are made, stored (as SHA-256 only) and checked on every /v1 request.

A key is `sk-` and 32 random bytes, url-safe base64 (43 characters). A fast hash is enough for a secret
with 256 bits of entropy: there is nothing to brute-force, so no bcrypt on the hot path.

Keys found are cached in the process for KEY_CACHE_TTL_S, so a busy key costs the database no read per
request; a revocation (or any change to a key) therefore reaches every server within that many seconds. A key
not in the cache is read by the database thread (ledger/writer.py), with the writes of its moment.
"""

import hashlib
import math
import re
import secrets
import time
from collections import OrderedDict
from functools import partial
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from db import ApiKey, now_ms
from ledger.request_log import add_timing
from ledger.writer import Transaction
from operations.errors import ApiError
from operations.metrics import Counter

KEY_PREFIX = "sk-"
KEY_BYTES = 32
KEY_PATTERN = re.compile(KEY_PREFIX + "[A-Za-z0-9_-]{%d}" % math.ceil(KEY_BYTES * 4 / 3))  # base64, no padding
DISPLAY_CHARS = 8  # random characters kept in the clear, so people can tell their keys apart
PREFIX_LENGTH = len(KEY_PREFIX) + DISPLAY_CHARS

AUTH_FAILURES = Counter("auth_failures_total", "Requests refused for their key, by error code.", ["code"])

KEY_COLUMNS = tuple(ApiKey.__table__.columns.keys())
KEY_BY_HASH = select(*ApiKey.__table__.columns).where(ApiKey.key_hash == bindparam("key_hash"))

bearer = HTTPBearer(auto_error=False, bearerFormat="sk-...", description="An API key from `python cli.py create-key`.")


class KeyCache:
    """Keys by hash, each trusted for `ttl_s` seconds after it was read; the least recently read go first
    beyond `max_keys`. Only keys that exist are kept, so random tokens cannot fill it."""

    def __init__(self, ttl_s: float, max_keys: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._keys: OrderedDict[str, tuple[float, ApiKey]] = OrderedDict()

    def get(self, key_hash: str) -> ApiKey | None:
        found = self._keys.get(key_hash)
        if found is None or found[0] <= time.monotonic():
            return None
        return found[1]

    def put(self, key_hash: str, api_key: ApiKey) -> None:
        if self.ttl_s <= 0:
            return
        self._keys[key_hash] = (time.monotonic() + self.ttl_s, api_key)
        self._keys.move_to_end(key_hash)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:PREFIX_LENGTH]


async def create_key(session: AsyncSession, email: str, rate_limit: int, window_s: int) -> tuple[str, ApiKey]:
    """A new key and its row; the plaintext key exists only in the return value."""
    key = generate_key()
    api_key = ApiKey(key_hash=hash_key(key), prefix=display_prefix(key), email=email,
                     rate_limit=rate_limit, window_s=window_s, created_at_ms=now_ms())
    session.add(api_key)
    await session.flush()
    return key, api_key


async def find_keys(session: AsyncSession, key_or_prefix: str) -> list[ApiKey]:
    """The key itself matches exactly one row (by hash); a shorter prefix may match several."""
    if KEY_PATTERN.fullmatch(key_or_prefix):
        query = select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_prefix))
    else:
        query = select(ApiKey).where(ApiKey.prefix.startswith(key_or_prefix, autoescape=True))
    return list((await session.scalars(query.order_by(ApiKey.id))).all())


def read_key(key_hash: str, transaction: Transaction) -> ApiKey | None:
    row = transaction.one(KEY_BY_HASH, key_hash=key_hash)
    return None if row is None else ApiKey(**dict(zip(KEY_COLUMNS, row)))


def unauthorized(code: str, message: str, headers: dict[str, str]) -> ApiError:
    AUTH_FAILURES.labels(code).inc()
    return ApiError(401, code, message, headers)


async def get_current_key(request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey:
    """The calling key, from `Authorization: Bearer sk-...`; 401 for anything else."""
    challenge = {"WWW-Authenticate": 'Bearer realm="api"'}
    if credentials is None:
        if "authorization" in request.headers:
            raise unauthorized("malformed_authorization",
                               "The Authorization header must be `Bearer <your API key>`.", challenge)
        raise unauthorized("missing_api_key", "Send your API key as `Authorization: Bearer sk-...`.", challenge)
    token = credentials.credentials
    api_key = None
    if KEY_PATTERN.fullmatch(token):  # anything else (a 5000-character string, SQL) cannot be a key: no lookup
        started = time.perf_counter()
        cache: KeyCache = request.app.state.key_cache
        key_hash = hash_key(token)
        api_key = cache.get(key_hash)
        if api_key is None:
            # Through the database thread, on the driver: a session on the async engine cost 15 times the CPU.
            api_key = await request.app.state.database_writer.run(partial(read_key, key_hash))
            if api_key is not None:
                cache.put(key_hash, api_key)  # a plain object, in no session: safe to share
        add_timing(request, "auth", started)
    invalid = {"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'}
    if api_key is None:
        raise unauthorized("invalid_api_key",
                           "The API key is not valid; check it, or create one with `python cli.py create-key`.", invalid)
    request.state.key_id = api_key.id  # the request log records it, revoked or not
    request.state.key_prefix = api_key.prefix  # the server log's line for the request shows it, never the key
    if api_key.revoked_at_ms is not None:
        raise unauthorized("revoked_api_key", f"The API key {api_key.prefix}... was revoked; use another key.", invalid)
    return api_key


CurrentKey = Annotated[ApiKey, Depends(get_current_key)]
