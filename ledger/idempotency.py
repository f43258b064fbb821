"""Idempotency keys: a request sent again with the same `Idempotency-Key` gets the first one's answer, once.

    requested_key         the header, checked before the body is read: 1 to 255 printable ASCII characters, or a 400
    claim_for             once the body is parsed: a Claim of the key for this request (a hash of what it asks,
                          the images' kind included: base64 text and a file of that text are two requests)
    has_stored_answer     a window this process saw full refuses a request at once, unless its key has an answer
    Claim.enter           in the admission's transaction, once the API key's row is locked (ratelimit.py): the
                          claim's row inserted (INSERT ... ON CONFLICT DO NOTHING), or why not: a stored answer
                          (Replayed, its row's id), a 409 while the first request runs, a 422 for another body;
                          none is charged against the limit
    Claim.leave           the admission was refused: the row goes, in the same transaction
    replay                the stored answer, read through the engine's pool, not on the database thread
    IdempotencyMiddleware a 200 answer (up to IDEMPOTENCY_MAX_STORED_BYTES) is stored in one job with its log row,
                          before it is sent: both are committed, or the client gets the log's 503 (or 500) and
                          nothing is stored; any other outcome gives the claim up, so a retry is processed again
    prune_expired         expired rows, deleted a small batch per transaction

Rows live in the database (`idempotency_keys`), with the Redis limiter too, so they hold across workers,
restarts and hosts. A claim whose request never ended (its process was killed) holds only for a lease
(REQUEST_TIMEOUT_S and twice DB_TIMEOUT_S: the longest a claimed request can take), then is taken over.
Times are the database's clock on PostgreSQL (read under the API key's lock), so hosts agree on expiries; on
SQLite, the one host's.
"""

import asyncio
import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db import IdempotencyKey, RequestLog, now_ms
from ledger.ratelimit import LOCK_KEY_AND_READ_CLOCK, READ_CLOCK
from ledger.writer import LAST_IN_GROUP, DatabaseWriter, Transaction, dialect_insert
from operations.errors import ApiError, error_response, handle_database_error

logger = logging.getLogger("classify")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
VALID_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# What describes the body; ids, timings and the limit's state are each answer's own.
STORED_HEADERS = (b"content-type",)
PRUNE_BATCH = 500  # rows per transaction: a prune holds its locks for milliseconds
PRUNE_INTERVAL_S = 60.0
# Images this small are hashed in the event loop: handing them to a thread and back costs more CPU than hashing.
INLINE_HASH_BYTES = 64 * 1024

THIS_KEY = (IdempotencyKey.key_id == bindparam("key_id"),
            IdempotencyKey.idempotency_key == bindparam("idempotency_key"))
MINE_IN_PROGRESS = (*THIS_KEY, IdempotencyKey.owner == bindparam("owner"), IdempotencyKey.status_code.is_(None))
DELETE_EXPIRED = delete(IdempotencyKey).where(*THIS_KEY, IdempotencyKey.expires_at_ms <= bindparam("now_ms"))
FIND = select(IdempotencyKey.id, IdempotencyKey.request_hash, IdempotencyKey.status_code).where(*THIS_KEY)
HAS_ANSWER = select(IdempotencyKey.id).where(*THIS_KEY, IdempotencyKey.status_code.is_not(None))
READ_ANSWER = select(IdempotencyKey.status_code, IdempotencyKey.response_headers, IdempotencyKey.response_body,
                     IdempotencyKey.model_version).where(IdempotencyKey.id == bindparam("row_id"))
RELEASE = delete(IdempotencyKey).where(*MINE_IN_PROGRESS)
COMPLETE = update(IdempotencyKey).where(*MINE_IN_PROGRESS).values(
    status_code=bindparam("answer_status"), response_headers=bindparam("answer_headers"),
    response_body=bindparam("answer_body"), model_version=bindparam("answer_model_version"),
    expires_at_ms=bindparam("answer_expires_at_ms"))
# SKIP LOCKED (PostgreSQL; SQLite has one writer at a time): a prune never waits for a claim being taken over.
PRUNE = delete(IdempotencyKey).where(IdempotencyKey.id.in_(
    select(IdempotencyKey.id).where(IdempotencyKey.expires_at_ms <= bindparam("now_ms")).limit(PRUNE_BATCH)
    .with_for_update(skip_locked=True)))


def _claim_insert(dialect_name: str) -> Any:
    # Its own `claim_` names: an INSERT's bind parameters are named for its columns, and these would clash.
    return dialect_insert(dialect_name)(IdempotencyKey).values(
        key_id=bindparam("claim_key_id"), idempotency_key=bindparam("claim_idempotency_key"),
        request_hash=bindparam("claim_request_hash"), owner=bindparam("claim_owner"),
        created_at_ms=bindparam("claim_now_ms"), expires_at_ms=bindparam("claim_expires_at_ms"),
    ).on_conflict_do_nothing(index_elements=["key_id", "idempotency_key"])


INSERT_CLAIM = {name: _claim_insert(name) for name in ("postgresql", "sqlite")}


def locked_clock_ms(transaction: Transaction, key_id: int) -> int:
    """The clock once the API key's row is locked: PostgreSQL's, which every host shares (the admission's own
    lock: every write of a key's rows takes it first, so they queue behind one lock per API key, taken in key
    order, and no two transactions wait for each other); on SQLite, under the write lock, this host's."""
    if transaction.is_postgres:
        return transaction.scalar(LOCK_KEY_AND_READ_CLOCK, key_id=key_id)
    return now_ms()


class Replayed(Exception):
    """A request sent before with this key and body was answered: `replay` sends the answer of row `row_id`."""

    def __init__(self, row_id: int) -> None:
        super().__init__(row_id)
        self.row_id = row_id


async def replay(request: Request, exc: Exception) -> Response:
    """The exception handler for Replayed: the stored answer, marked as a replay (also in the request log).

    It is read here, through the engine's pool, so a large answer does not hold up the database thread."""
    assert isinstance(exc, Replayed)
    try:
        async with request.app.state.engine.connect() as connection:
            stored = (await connection.execute(READ_ANSWER, {"row_id": exc.row_id})).one_or_none()
    except Exception as read_error:  # the database is away: a 503 like any other read's
        return await handle_database_error(request, read_error)
    if stored is None:  # pruned the moment it expired: the next retry is processed as new
        return error_response(request, 409, "idempotency_key_in_use", f"The answer to this {HEADER} has just "
                                                                      "expired; retry to have it processed again.",
                              {"Retry-After": "1"})
    status_code, headers, body, model_version = stored
    request.state.is_replayed = True
    request.state.model_version = model_version  # the version that answered, for the request log's row
    kept = {name: value for name, value in json.loads(headers).items() if name.lower().encode() in STORED_HEADERS}
    return Response(bytes(body), status_code, headers={**kept, REPLAYED_HEADER: "true"})


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


async def has_stored_answer(engine: AsyncEngine, key_id: int, idempotency_key: str) -> bool:
    """Whether this key has an answer stored (expired or not: the admission decides): one indexed read."""
    async with engine.connect() as connection:
        found = await connection.execute(HAS_ANSWER, {"key_id": key_id, "idempotency_key": idempotency_key})
        return found.first() is not None


@dataclass
class Claim:
    """One request's hold on its Idempotency-Key (an AdmissionGuard of ratelimit.py)."""

    key_id: int
    idempotency_key: str
    request_hash: str
    legacy_hash: str  # what a release before the source's kind was hashed stored for this request (request_hashes)
    lease_ms: int  # how long an unfinished claim holds
    ttl_ms: int  # how long a stored answer is replayed
    owner: str = field(default_factory=lambda: secrets.token_hex(16))
    is_held: bool = False  # set by the database thread: this request inserted the row (read once admitted)
    is_stored: bool = False  # set on the event loop: the answer is committed; any other claim is released

    def _names(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "idempotency_key": self.idempotency_key}

    def enter(self, transaction: Transaction, *, at_ms: int | None) -> None:
        """Claims the key for this request; otherwise raises why not. Nothing is charged against the limit then.
        `at_ms`: the clock the admission read under the API key's lock; None, it is locked and read here."""
        self.is_held = False  # a group written again item by item runs this again, on a rolled-back database
        if at_ms is None:
            at_ms = locked_clock_ms(transaction, self.key_id)
        transaction.execute(DELETE_EXPIRED, **self._names(), now_ms=at_ms)  # its answer, or a dead request's claim
        found = None
        # Twice at most: on PostgreSQL DO NOTHING locks nothing, so another host's prune may delete the row met
        # before it is read; a row inserted after that is not expired, so the second try finds or inserts.
        for _ in range(2):
            inserted = transaction.execute(
                INSERT_CLAIM[transaction.dialect.name], claim_key_id=self.key_id,
                claim_idempotency_key=self.idempotency_key, claim_request_hash=self.request_hash,
                claim_owner=self.owner, claim_now_ms=at_ms, claim_expires_at_ms=at_ms + self.lease_ms).rowcount
            if inserted == 1:
                self.is_held = True
                return
            found = transaction.one(FIND, **self._names())
            if found is not None:
                break
        assert found is not None, "an idempotency key's row went twice between its INSERT and its read"
        row_id, stored_hash, status_code = found
        if stored_hash not in (self.request_hash, self.legacy_hash):
            raise ApiError(422, "idempotency_key_reused", f"This {HEADER} was sent with another request (another "
                                                          "body or endpoint) by this key; use a fresh key for a new "
                                                          "request.")
        if status_code is None:
            raise ApiError(409, "idempotency_key_in_use", f"A request with this {HEADER} is still being processed; "
                                                          "retry after Retry-After seconds for its answer.",
                           {"Retry-After": "1"})
        raise Replayed(row_id)

    def leave(self, transaction: Transaction, *, is_key_locked: bool) -> None:
        """Gives the claim up: a request with this key is processed again. `is_key_locked`: the transaction
        holds the API key's row lock (PostgreSQL) already."""
        if not is_key_locked:
            locked_clock_ms(transaction, self.key_id)
        transaction.execute(RELEASE, **self._names(), owner=self.owner)
        self.is_held = False

    def complete(self, transaction: Transaction, status_code: int, headers: dict[str, str], body: bytes,
                 model_version: str | None) -> None:
        """Stores the answer, replayed to repeats for IDEMPOTENCY_TTL_S."""
        at_ms = locked_clock_ms(transaction, self.key_id)
        transaction.execute(COMPLETE, **self._names(), owner=self.owner, answer_status=status_code,
                            answer_headers=json.dumps(headers), answer_body=body,
                            answer_model_version=model_version, answer_expires_at_ms=at_ms + self.ttl_ms)


def request_hashes(path: str, sources: list[str | bytes], asked: dict[str, object]) -> tuple[str, str]:
    """SHA-256 of what the request asks (endpoint, options, images, and how the images came: base64 text in JSON
    or a multipart file's bytes): the same whatever the JSON's spacing or field order, or a form's boundary.

    Second, the legacy hash: the same without the sources' kind, as releases before it was hashed stored it,
    so that a repeat of a request they answered still gets that answer. It cannot tell base64 text from a file
    holding that text, so for a row they stored either is taken as the repeat (until the row expires, after
    IDEMPOTENCY_TTL_S); a row stored since tells them apart."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"path": path, **asked}, sort_keys=True).encode())
    for source in sources:
        data = source.encode() if isinstance(source, str) else source
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    legacy = digest.hexdigest()
    kind = "base64" if all(isinstance(source, str) for source in sources) else "file"
    return hashlib.sha256(f"{kind}\n{legacy}".encode()).hexdigest(), legacy


async def claim_for(request: Request, key_id: int, sources: list[str | bytes], asked: dict[str, object],
                    idempotency_key: str | None) -> Claim | None:
    """The claim to enter with the request's admission, kept in its state for the middleware; None without a key.
    `sources`: the request's images as sent; `asked`: its other fields (edge/request_body.ImagesToClassify)."""
    if idempotency_key is None:
        return None
    settings = request.app.state.settings
    if sum(len(source) for source in sources) <= INLINE_HASH_BYTES:
        digest, legacy = request_hashes(request.url.path, sources, asked)
    else:  # 20 MB take 10 ms to hash: not in the event loop
        digest, legacy = await asyncio.get_running_loop().run_in_executor(
            request.app.state.decode_pool, request_hashes, request.url.path, sources, asked)
    claim = Claim(key_id, idempotency_key, digest, legacy,
                  lease_ms=int((settings.request_timeout_s + 2 * settings.db_timeout_s) * 1000),
                  ttl_ms=settings.idempotency_ttl_s * 1000)
    request.state.idempotency_claim = claim
    return claim


class IdempotencyMiddleware:
    """Stores a claimed request's 200 answer before it is sent, and gives the claim up on any other outcome.

    It sits inside RequestLogMiddleware, and hands it the job that writes the log row (`write_log_row` in the
    request's state): the answer is stored in the same transaction as the row, so both are committed before the
    client reads a byte, or neither is and the client gets the log's error instead of the answer.
    """

    def __init__(self, app: ASGIApp, max_stored_bytes: int) -> None:
        self.app = app
        self.max_stored_bytes = max_stored_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        writer: DatabaseWriter = scope["app"].state.database_writer
        start: Message | None = None
        body = bytearray()

        async def send_storing(message: Message) -> None:
            nonlocal start
            claim: Claim | None = state.get("idempotency_claim")
            # is_held is the database thread's, and settled: a response starts only once the admission is over.
            if claim is None or not claim.is_held:
                await send(message)
            elif message["type"] == "http.response.start":
                if message["status"] == 200:
                    start = message  # held back until the body is stored
                else:
                    claim.is_held = False
                    await send(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                is_last = not message.get("more_body", False)
                assert start is not None
                if len(body) > self.max_stored_bytes:  # too large to keep: sent as it comes, and released
                    claim.is_held = False
                    await send(start)
                    await send({"type": "http.response.body", "body": bytes(body), "more_body": not is_last})
                elif is_last:
                    headers = {name.decode(): value.decode() for name, value in start["headers"]
                               if name.lower() in STORED_HEADERS}
                    state["write_log_row"] = partial(self.store_with_log_row, writer, claim, headers, bytes(body),
                                                     state.get("model_version"))
                    await send(start)  # the request log writes its row and the answer, then sends it
                    await send({"type": "http.response.body", "body": bytes(body)})

        try:
            await self.app(scope, receive, send_storing)
        finally:
            claim = state.get("idempotency_claim")
            # Always, unless stored: a request cancelled during its admission may hold a claim the database thread
            # committed after it left. RELEASE deletes only this claim's unfinished row.
            if claim is not None and not claim.is_stored:
                self.release(writer, claim)

    @staticmethod
    async def store_with_log_row(writer: DatabaseWriter, claim: Claim, headers: dict[str, str], body: bytes,
                                 model_version: str | None, row: dict[str, Any]) -> None:
        """The answer and the request's log row, in one job: committed together, or neither."""
        job = partial(_store_with_log_row, claim, headers, body, model_version, row)
        # Shielded, as the log's rows are: a caller cancelled meanwhile does not take its row out of the group.
        await asyncio.shield(writer.run_soon(job, order=claim.key_id))
        claim.is_stored = True

    @staticmethod
    def release(writer: DatabaseWriter, claim: Claim) -> None:
        """Hands the release to the database thread without waiting: the answer does not depend on it."""
        released = writer.run_soon(partial(claim.leave, is_key_locked=False), order=claim.key_id)
        released.add_done_callback(_log_failure)
        claim.is_held = False


def _store_with_log_row(claim: Claim, headers: dict[str, str], body: bytes, model_version: str | None,
                        row: dict[str, Any], transaction: Transaction) -> None:
    claim.complete(transaction, 200, headers, body, model_version)
    transaction.insert(RequestLog, [row])


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not release an %s (it holds until its lease ends): %s", HEADER, future.exception())


def _prune(transaction: Transaction) -> int:
    at_ms = transaction.scalar(READ_CLOCK) if transaction.is_postgres else now_ms()
    return transaction.execute(PRUNE, now_ms=at_ms).rowcount


async def prune_expired(writer: DatabaseWriter, ttl_s: float) -> None:
    """Deletes expired rows for good, PRUNE_BATCH per transaction, as long as full batches come back; then waits."""
    while True:
        try:
            deleted = await writer.run(_prune, order=LAST_IN_GROUP)
        except Exception as exc:  # the database is away: next time
            logger.warning("could not prune expired idempotency keys: %s", exc)
            deleted = 0
        await asyncio.sleep(0 if deleted >= PRUNE_BATCH else min(PRUNE_INTERVAL_S, ttl_s))
