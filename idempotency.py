"""Idempotency keys: a request sent again with the same `Idempotency-Key` gets the first one's answer, once.

    requested_key         the header, checked before the body is read: 1 to 255 printable ASCII characters, or a 400
    claim_for             once the body is parsed: a Claim of the key for this request (a hash of what it asks)
    Claim.enter           in the admission's transaction, once the API key's row is locked (ratelimit.py): the
                          claim's row inserted (INSERT ... ON CONFLICT DO NOTHING), or why not: the stored answer
                          (Replayed), a 409 while the first request runs, a 422 for another body; none is counted
    Claim.leave           the admission was refused: the row goes, in the same transaction
    IdempotencyMiddleware a 200 answer is stored before it is sent, in the database thread's group of its log
                          row (no extra wait); any other outcome gives the claim up, so a retry is processed again
    prune_expired         expired rows, deleted a small batch per transaction

Rows live in the database (`idempotency_keys`), with the Redis limiter too, so they hold across workers,
restarts and hosts. A claim whose request never ended (its process was killed) holds only for a lease
(REQUEST_TIMEOUT_S and twice DB_TIMEOUT_S: the longest a claimed request can take), then is taken over.
Times are each host's clock: a skew of seconds only moves expiries by as much.
"""

import asyncio
import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from database_writer import DatabaseWriter, Transaction
from db import ApiKey, IdempotencyKey, now_ms
from errors import ApiError
from request_body import INLINE_PARSE_BYTES, ImagesToClassify

logger = logging.getLogger("classify")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
VALID_KEY = re.compile(r"[\x20-\x7e]{1,255}")
STORED_HEADERS = (b"content-type",)  # what describes the body; ids, timings and the limit's state are each answer's own
PRUNE_BATCH = 500  # rows per transaction: a prune holds its locks for milliseconds
PRUNE_INTERVAL_S = 60.0
PRUNE_ORDER = 2**62  # last in its group (database_writer's `order`), after every key's admission

THIS_KEY = (IdempotencyKey.key_id == bindparam("key_id"), IdempotencyKey.idempotency_key == bindparam("idempotency_key"))
MINE_IN_PROGRESS = (*THIS_KEY, IdempotencyKey.owner == bindparam("owner"), IdempotencyKey.status_code.is_(None))
# The admission's own lock (ratelimit.LOCK_KEY_AND_READ_CLOCK): every write of a key's rows takes it first, so
# they queue behind one lock per API key, taken in key order, and no two transactions wait for each other.
LOCK_API_KEY = select(ApiKey.id).where(ApiKey.id == bindparam("key_id")).with_for_update(key_share=True)
DELETE_EXPIRED = delete(IdempotencyKey).where(*THIS_KEY, IdempotencyKey.expires_at_ms <= bindparam("now_ms"))
FIND = select(IdempotencyKey.request_hash, IdempotencyKey.status_code, IdempotencyKey.response_headers,
              IdempotencyKey.response_body).where(*THIS_KEY)
RELEASE = delete(IdempotencyKey).where(*MINE_IN_PROGRESS)
COMPLETE = update(IdempotencyKey).where(*MINE_IN_PROGRESS).values(
    status_code=bindparam("answer_status"), response_headers=bindparam("answer_headers"),
    response_body=bindparam("answer_body"), expires_at_ms=bindparam("answer_expires_at_ms"))
# SKIP LOCKED (PostgreSQL; SQLite has one writer at a time): a prune never waits for a claim being taken over.
PRUNE = delete(IdempotencyKey).where(IdempotencyKey.id.in_(
    select(IdempotencyKey.id).where(IdempotencyKey.expires_at_ms <= bindparam("now_ms")).limit(PRUNE_BATCH)
    .with_for_update(skip_locked=True)))


def _claim_insert(dialect_insert: Any) -> Any:
    return dialect_insert(IdempotencyKey).values(
        key_id=bindparam("claim_key_id"), idempotency_key=bindparam("claim_idempotency_key"),
        request_hash=bindparam("claim_request_hash"), owner=bindparam("claim_owner"),
        created_at_ms=bindparam("claim_now_ms"), expires_at_ms=bindparam("claim_expires_at_ms"),
    ).on_conflict_do_nothing(index_elements=["key_id", "idempotency_key"])


INSERT_CLAIM = {"postgresql": _claim_insert(postgresql.insert), "sqlite": _claim_insert(sqlite.insert)}


class Replayed(Exception):
    """The stored answer to a request sent before with this key and body: `replay` sends it."""

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(status_code)
        self.status_code = status_code
        self.headers = headers
        self.body = body


async def replay(request: Request, exc: Exception) -> Response:
    """The exception handler for Replayed: the stored answer, marked as a replay (also in the request log)."""
    assert isinstance(exc, Replayed)
    request.state.is_replayed = True
    return Response(exc.body, exc.status_code, headers={**exc.headers, REPLAYED_HEADER: "true"})


def requested_key(request: Request) -> str | None:
    """The request's Idempotency-Key, if it sent one; a 400 unless it is one of 1 to 255 printable ASCII characters."""
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1 or not VALID_KEY.fullmatch(values[0]):
        raise ApiError(400, "invalid_idempotency_key", f"{HEADER} must be one header of 1 to 255 printable ASCII "
                                                       "characters; send a fresh UUID with each new request, and "
                                                       "the same one with its retries.")
    return values[0]


@dataclass
class Claim:
    """One request's hold on its Idempotency-Key (an AdmissionGuard of ratelimit.py)."""

    key_id: int
    idempotency_key: str
    request_hash: str
    lease_ms: int  # how long an unfinished claim holds
    ttl_ms: int  # how long a stored answer is replayed
    owner: str = field(default_factory=lambda: secrets.token_hex(16))
    is_held: bool = False  # this request inserted the row and has not completed or released it

    def _names(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "idempotency_key": self.idempotency_key}

    def enter(self, transaction: Transaction, is_key_locked: bool = True) -> None:
        """Claims the key for this request; otherwise raises why not. Nothing is counted against the limit then."""
        self.is_held = False  # a group written again item by item runs this again, on a rolled-back database
        if transaction.is_postgres and not is_key_locked:
            transaction.execute(LOCK_API_KEY, key_id=self.key_id)
        at_ms = now_ms()
        transaction.execute(DELETE_EXPIRED, **self._names(), now_ms=at_ms)  # its answer, or a dead request's claim
        inserted = transaction.execute(
            INSERT_CLAIM[transaction.dialect.name], claim_key_id=self.key_id, claim_idempotency_key=self.idempotency_key,
            claim_request_hash=self.request_hash, claim_owner=self.owner, claim_now_ms=at_ms,
            claim_expires_at_ms=at_ms + self.lease_ms).rowcount
        if inserted == 1:
            self.is_held = True
            return
        request_hash, status_code, headers, body = transaction.one(FIND, **self._names())
        if request_hash != self.request_hash:
            raise ApiError(422, "idempotency_key_reused", f"This {HEADER} was sent with another request (another "
                                                          "body or endpoint) by this key; use a fresh key for a new "
                                                          "request.")
        if status_code is None:
            raise ApiError(409, "idempotency_key_in_use", f"A request with this {HEADER} is still being processed; "
                                                          "retry after Retry-After seconds for its answer.",
                           {"Retry-After": "1"})
        raise Replayed(status_code, json.loads(headers), bytes(body))

    def leave(self, transaction: Transaction, is_key_locked: bool = True) -> None:
        """Gives the claim up: a request with this key is processed again."""
        if transaction.is_postgres and not is_key_locked:
            transaction.execute(LOCK_API_KEY, key_id=self.key_id)
        transaction.execute(RELEASE, **self._names(), owner=self.owner)
        self.is_held = False

    def complete(self, status_code: int, headers: dict[str, str], body: bytes, transaction: Transaction) -> None:
        """Stores the answer, replayed to repeats for IDEMPOTENCY_TTL_S."""
        if transaction.is_postgres:
            transaction.execute(LOCK_API_KEY, key_id=self.key_id)
        transaction.execute(COMPLETE, **self._names(), owner=self.owner, answer_status=status_code,
                            answer_headers=json.dumps(headers), answer_body=body,
                            answer_expires_at_ms=now_ms() + self.ttl_ms)


def request_hash(path: str, to_classify: ImagesToClassify) -> str:
    """SHA-256 of what the request asks (endpoint, options, images): the same whatever the JSON's spacing or
    field order, or a form's boundary."""
    digest = hashlib.sha256()
    options = {option.name: getattr(to_classify, option.name) for option in fields(to_classify)
               if option.name != "sources"}
    digest.update(json.dumps({"path": path, **options}, sort_keys=True).encode())
    for source in to_classify.sources:
        data = source.encode() if isinstance(source, str) else source
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


async def claim_for(request: Request, key_id: int, to_classify: ImagesToClassify,
                    idempotency_key: str | None) -> Claim | None:
    """The claim to enter with the request's admission, kept in its state for the middleware; None without a key."""
    if idempotency_key is None:
        return None
    settings = request.app.state.settings
    size = sum(len(source) for source in to_classify.sources)
    if size <= INLINE_PARSE_BYTES:
        digest = request_hash(request.url.path, to_classify)
    else:  # 20 MB take 10 ms to hash: not in the event loop
        digest = await asyncio.get_running_loop().run_in_executor(
            request.app.state.decode_pool, request_hash, request.url.path, to_classify)
    claim = Claim(key_id, idempotency_key, digest,
                  lease_ms=int((settings.request_timeout_s + 2 * settings.db_timeout_s) * 1000),
                  ttl_ms=settings.idempotency_ttl_s * 1000)
    request.state.idempotency_claim = claim
    return claim


class IdempotencyMiddleware:
    """Stores a claimed request's 200 answer before it is sent, and gives the claim up on any other outcome.

    It sits inside RequestLogMiddleware: the answer is handed to the database thread just before the log row,
    so both go in one group (or the answer in an earlier one), committed before the client reads a byte.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        writer: DatabaseWriter = scope["app"].state.database_writer
        start: Message | None = None
        body = bytearray()
        stored: asyncio.Future[None] | None = None

        async def send_storing(message: Message) -> None:
            nonlocal start, stored
            claim: Claim | None = state.get("idempotency_claim")
            if claim is None or not claim.is_held:
                await send(message)
            elif message["type"] == "http.response.start":
                if message["status"] == 200:
                    start = message  # held back until the body is stored
                else:
                    self.release(writer, claim)
                    await send(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    assert start is not None
                    headers = {name.decode(): value.decode() for name, value in start["headers"]
                               if name.lower() in STORED_HEADERS}
                    stored = writer.run_soon(partial(claim.complete, 200, headers, bytes(body)), order=claim.key_id)
                    claim.is_held = False
                    await send(start)
                    await send({"type": "http.response.body", "body": bytes(body)})

        try:
            await self.app(scope, receive, send_storing)
        finally:
            claim = state.get("idempotency_claim")
            if claim is not None and claim.is_held:  # an exception, or the request was cancelled
                self.release(writer, claim)
        if stored is not None:
            try:
                await stored
            except Exception as exc:  # the answer went; its retry will be processed again once the lease ends
                logger.warning("could not store the answer for an %s: %s", HEADER, exc)

    @staticmethod
    def release(writer: DatabaseWriter, claim: Claim) -> None:
        """Hands the release to the database thread without waiting: the answer does not depend on it."""
        released = writer.run_soon(partial(claim.leave, is_key_locked=False), order=claim.key_id)
        released.add_done_callback(_log_failure)
        claim.is_held = False


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not release an %s (it holds until its lease ends): %s", HEADER, future.exception())


def _prune(transaction: Transaction) -> int:
    return transaction.execute(PRUNE, now_ms=now_ms()).rowcount


async def prune_expired(writer: DatabaseWriter, ttl_s: float) -> None:
    """Deletes expired rows for good, PRUNE_BATCH per transaction, as long as full batches come back; then waits."""
    while True:
        try:
            deleted = await writer.run(_prune, order=PRUNE_ORDER)
        except Exception as exc:  # the database is away: next time
            logger.warning("could not prune expired idempotency keys: %s", exc)
            deleted = 0
        await asyncio.sleep(0 if deleted >= PRUNE_BATCH else min(PRUNE_INTERVAL_S, ttl_s))
