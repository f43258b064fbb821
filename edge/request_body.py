"""The /v1/classify (and /v1/embeddings) body: read under its limits, parsed (JSON or multipart), and decoded
into model inputs.

    BodyMemory              room for the bodies held at once (MAX_BODY_MEMORY_BYTES), reserved before one is read
    read_body               413 past MAX_BODY_BYTES (declared or streamed), 503 with no room for it (BodyMemory),
                            408 past BODY_TIMEOUT_S, 503 at shutdown, 400 if its framing breaks (edge/protocol.py)
    parse_body              parse_classify_request where the body was read, or in a decoding thread when large
    parse_classify_request  JSON {"image"} / {"images"} or a multipart `file` -> ImagesToClassify; 422 otherwise
                            (the route's schema says which options come with the images; before parsing, a
                            422 for JSON with more values than a valid body can hold)
    decode_images           base64 -> Pillow -> (224, 224, 3) uint8 per image, in the decoding threads
"""

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from edge.protocol import BODY_ERROR
from edge.schemas import ClassifyRequest, EncodingFormat, ImagesRequest
from edge.uploads import DEFAULT_TOP_K, is_multipart, parse_multipart
from engine.images import decode_base64, decode_for_model
from inference import ModelSpec, preprocess
from operations.errors import ApiError, MalformedBody, NotAdmitted
from operations.shutdown import Shutdown, ShuttingDown
from settings import MAX_IMAGES

# pydantic builds a body's whole JSON tree before it meets a field it forbids or a list over its cap, at about
# 50 bytes a value (a GB for 20 MB of `{},`), so a body is first checked to hold no more values than a valid one
# can: each image takes a comma (a data URL one more), the fields a few, the object and its list two brackets.
MAX_JSON_SEPARATORS = 2 * MAX_IMAGES + 16
# A body this small is parsed in the event loop: handing it to a thread and back costs more CPU (0.04 ms) than
# the time this saves there, and parsing it holds the loop under 0.1 ms (0.05 ms for a 46 KB photo).
INLINE_PARSE_BYTES = 64 * 1024


# What a body of N bytes holds at its peak, measured: its bytes, the base64 text (or file) parsed from them, and
# the JSON parser's own copy of that text while it makes it; the image's bytes are decoded once the body is gone.
BODY_MEMORY_FACTOR = 3
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_ALLOCATION_BYTES = 4 * 1024 * 1024


def return_freed_bodies_to_the_system() -> None:
    """Bodies, and the text and bytes made from them, mapped apart and unmapped once freed: glibc raises its
    threshold for that to the size of the largest block it frees (up to 32 MiB), and then keeps what bodies took,
    so the process held its highest use for good (24 uploads of 19 MiB: 537 MB from 239, once they were done)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)
    except (OSError, AttributeError, TypeError):  # not glibc: its allocator is its own
        pass


class BodyMemory:
    """The memory the bodies being read, parsed and decoded hold at once, bounded by MAX_BODY_MEMORY_BYTES: a
    body's room is taken as its bytes arrive, BODY_MEMORY_FACTOR times their size, and freed once its images are
    decoded; a body declared too big for the room left is refused before it is read. Without it, 24 uploads of
    19 MiB held at once took the server from 1,075 to 2,048 MB. A declared length takes no room until its bytes
    come: five connections declaring 20 MiB each and sending nothing shut out every upload for BODY_TIMEOUT_S."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0  # the event loop's alone: no lock

    @contextmanager
    def reserving(self) -> Iterator["BodyRoom"]:
        room = BodyRoom(self)
        try:
            yield room
        finally:
            room.release()


class BodyRoom:
    """One request's share of BodyMemory."""

    def __init__(self, memory: BodyMemory) -> None:
        self.memory = memory
        self.bytes = 0

    def check(self, body_bytes: int) -> None:
        """A 503 (uncounted: the server's room, not the request) unless `body_bytes` more of the body would fit now."""
        if self.memory.held_bytes + BODY_MEMORY_FACTOR * body_bytes > self.memory.limit_bytes:
            raise NotAdmitted(503, "too_many_uploads", f"The server is reading as many request bodies as its memory "
                                                       f"allows (MAX_BODY_MEMORY_BYTES={self.memory.limit_bytes}); "
                                                       "retry shortly.", {"Retry-After": "1"})

    def grow(self, body_bytes: int) -> None:
        """Room for `body_bytes` more of the body, or the 503 of `check`."""
        self.check(body_bytes)
        self.memory.held_bytes += BODY_MEMORY_FACTOR * body_bytes
        self.bytes += BODY_MEMORY_FACTOR * body_bytes

    def release(self) -> None:
        self.memory.held_bytes -= self.bytes
        self.bytes = 0


async def read_body(request: Request, max_bytes: int, timeout_s: float, room: BodyRoom,
                    shutdown: Shutdown | None = None) -> bytearray:
    """The body, refused with 413 as soon as it is known to be too big (Content-Length, or while streaming), with
    503 when `room` cannot be had for it (for a declared length, before it is read), and with 408 if it has not all
    arrived within `timeout_s`; ShuttingDown if the shutdown deadline comes first."""
    too_large = ApiError(413, "body_too_large", f"The request body is over {max_bytes} bytes (MAX_BODY_BYTES); "
                                                "send a smaller or more compressed image.")
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else None
    if "transfer-encoding" in request.headers:
        length = None  # h11 reads the body by its chunks, whatever Content-Length says (edge/protocol.py)
    if length is not None and length > max_bytes:
        raise too_large
    if length is not None:
        room.check(length)
    body = bytearray()
    body_deadline = time.monotonic() + timeout_s
    try:
        async with asyncio.timeout(timeout_s) as timeout:
            with shutdown.bounding(timeout) if shutdown is not None else nullcontext():
                # The messages themselves, not request.stream(): one may say the body's framing broke (BODY_ERROR).
                while True:
                    message = await request.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnect
                    if BODY_ERROR in message:
                        raise MalformedBody(message[BODY_ERROR])
                    chunk = message.get("body", b"")
                    if len(body) + len(chunk) > max_bytes:
                        raise too_large
                    room.grow(len(chunk))
                    body += chunk
                    if not message.get("more_body", False):
                        break
    except TimeoutError:
        if shutdown is not None and shutdown.deadline is not None and shutdown.deadline <= body_deadline:
            raise ShuttingDown from None
        raise ApiError(408, "body_timeout", f"The body did not arrive within {timeout_s:g} s (BODY_TIMEOUT_S).") from None
    except ClientDisconnect:
        raise ApiError(499, "client_closed_request", "The client closed the connection before sending the body.") from None
    return body


@dataclass
class ImagesToClassify:
    sources: list[str | bytes]  # base64 text from JSON, or a multipart file's bytes
    is_list: bool  # sent as "images": answered as a list, and errors name the image
    top_k: int = DEFAULT_TOP_K  # /v1/classify's options
    min_confidence: float = 0.0
    encoding_format: EncodingFormat = "float"  # /v1/embeddings' option

    def asked(self) -> dict[str, object]:
        """What the request asks besides its images (an Idempotency-Key's claim hashes it with them)."""
        return {name: value for name, value in vars(self).items() if name != "sources"}


async def parse_body(pool: Executor, body: bytes | bytearray, content_type: str,
                     schema: type[ImagesRequest] = ClassifyRequest) -> "ImagesToClassify":
    if len(body) <= INLINE_PARSE_BYTES:
        return parse_classify_request(body, content_type, schema)
    return await asyncio.get_running_loop().run_in_executor(pool, parse_classify_request, body, content_type, schema)


def parse_classify_request(body: bytes | bytearray, content_type: str,
                           schema: type[ImagesRequest] = ClassifyRequest) -> ImagesToClassify:
    """The JSON (or multipart) body, validated; 422 in FastAPI's shape if it is not a `schema`."""
    if is_multipart(content_type):
        data, options = parse_multipart(body, content_type, schema.option_names())
        return ImagesToClassify([data], is_list=False, **options)  # type: ignore[arg-type]
    check_json_size(body)
    try:
        parsed = schema.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None
    options = parsed.options()
    return ImagesToClassify(parsed.all_images, is_list=parsed.images is not None, **options)  # type: ignore[arg-type]


def check_json_size(body: bytes | bytearray) -> None:
    """A 422 for a body with more commas and brackets than any valid request, counted on the raw bytes: inside
    strings too, where base64 has none (a string full of them is no image either). bytes.find (memchr) skips
    the base64 between them at memory speed, and counting stops past the cap."""
    separators = 0
    for separator in b",[{":
        at = body.find(separator)
        while at >= 0:
            separators += 1
            if separators > MAX_JSON_SEPARATORS:
                raise ApiError(422, "invalid_request",
                               f"The JSON body has more than {MAX_JSON_SEPARATORS} commas and brackets, more than a "
                               f"valid one holds: send {{\"image\": \"<base64>\"}} or {{\"images\": [...]}} with at "
                               f"most {MAX_IMAGES} base64 strings, and optionally \"top_k\".")
            at = body.find(separator, at + 1)


def image_array(source: str | bytes, index: int | None, spec: ModelSpec, max_image_pixels: int) -> np.ndarray:
    """base64 (or the file's bytes) -> (224, 224, 3) uint8. Milliseconds per megabyte: off the event loop."""
    try:
        data = decode_base64(source) if isinstance(source, str) else source
        return preprocess(decode_for_model(data, max_image_pixels, spec.resize, spec.crop, spec.interpolation))
    except ApiError as exc:
        if index is not None:
            exc.message = f"images[{index}]: {exc.message}"
        raise


async def decode_images(pool: Executor, to_classify: ImagesToClassify, spec: ModelSpec,
                        max_image_pixels: int) -> list[np.ndarray]:
    """All of a request's images at once, one decoding thread each; errors name the image in a list."""
    loop = asyncio.get_running_loop()
    indexes: Sequence[int | None] = range(len(to_classify.sources)) if to_classify.is_list else [None]
    # Every decode finishes before the answer (none runs on unaccounted for), and the first broken image is named.
    decoded = await asyncio.gather(*(loop.run_in_executor(pool, image_array, source, index, spec, max_image_pixels)
                                     for index, source in zip(indexes, to_classify.sources)), return_exceptions=True)
    for result in decoded:
        if isinstance(result, BaseException):
            raise result
    return decoded  # type: ignore[return-value]
