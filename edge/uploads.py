"""multipart/form-data bodies for /v1/classify and /v1/embeddings: the `file` part's bytes and the route's optional
small fields (`top_k`, `min_confidence`; `encoding_format`).

    $ curl -s localhost:8000/v1/classify -H "Authorization: Bearer $KEY" -F file=@cat.jpg -F top_k=3 -F min_confidence=0.2

The body has already been read whole under MAX_BODY_BYTES (request_body.read_body), so what is bounded here is what
multipart itself adds for an attacker to play with: the boundary (at most 70 characters, RFC 2046), the number
of parts, and the number and size of each part's headers (the parser's own caps; python-multipart >= 0.0.27
has them, >= 0.0.18 skips preambles and epilogues without per-byte work). Every failure is a 4xx `ApiError`
that says what to send instead.
"""

import re

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from edge.schemas import MAX_TOP_K, ClassifyRequest
from operations.errors import ApiError

MAX_HEADERS_PER_PART = 4  # Content-Disposition, Content-Type, and room for a client's extra one or two
MAX_HEADER_BYTES = 1024  # one header line; a filename longer than this is no filename
DEFAULT_TOP_K: int = ClassifyRequest.model_fields["top_k"].default
# "20", "0.25" or "base64", with room for digits and whitespace; a megabyte "number" is refused while it arrives
MAX_FIELD_BYTES = 24
BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046's bchars

# Both request bodies, as /openapi.json shows them; the route puts this beside the JSON one.
FILE_SCHEMA = {"type": "string", "format": "binary", "description": "The image file, as it is on disk."}
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": FILE_SCHEMA,
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": DEFAULT_TOP_K,
                  "description": "How many labels to return, most likely first."},
        "min_confidence": {"type": "number", "minimum": 0, "maximum": 1, "default": 0,
                           "description": "Of those, only labels at least this confident: an answer may hold fewer, "
                                          "or none."},
    },
}
EMBEDDINGS_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": FILE_SCHEMA, "encoding_format": {"type": "string", "enum": ["float", "base64"],
                                                            "default": "float"}},
}


def is_multipart(content_type: str) -> bool:
    return content_type.lower().lstrip().startswith("multipart/")


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"Fix the request: {message}.")


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type; 415 for other multiparts."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       "Send multipart/form-data with a `file` part, or JSON: {\"image\": \"<base64>\", \"top_k\": 5}.")
    boundary = options.get(b"boundary", b"")
    if not BOUNDARY.fullmatch(boundary):
        raise ApiError(400, "invalid_multipart", "The Content-Type needs a boundary of 1 to 70 characters "
                                                 "(RFC 2046); let your HTTP library write the multipart body.")
    return boundary


class FormCollector:
    """The parser's callbacks: keeps `file` and the route's `options`, refuses anything else as soon as its name is
    known."""

    def __init__(self, options: tuple[str, ...]) -> None:
        self.fields = ("file", *options)
        self.expected = " and optionally ".join(f"`{name}`" for name in self.fields)
        self.values: dict[str, list[bytes]] = {}  # chunks: a file that arrives whole is never copied again
        self.parts = 0
        self.is_complete = False
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.current: str | None = None  # the field whose data is arriving

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > len(self.fields):
            raise invalid(f"send at most {len(self.fields)} parts: {self.expected}")
        self.current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            if self.current is not None:
                raise invalid("a part has two Content-Disposition headers: send one per part")
            disposition, options = parse_options_header(self.header_value.decode("latin-1"))
            name = options.get(b"name", b"").decode("latin-1")
            if disposition != b"form-data" or not name:
                raise invalid("each part needs `Content-Disposition: form-data; name=\"...\"`")
            if name not in self.fields:
                expected = self.expected.replace("`file`", "`file` (the image)", 1)
                raise invalid(f"unknown field `{name[:40]}`: send {expected}")
            if name in self.values:
                raise invalid(f"`{name}` is sent twice: send one image per request")
            self.current = name
            self.values[name] = []
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        if self.current is None:
            raise invalid("a part has no Content-Disposition header naming its field")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self.current is not None
        chunks = self.values[self.current]
        chunks.append(data[start:end])
        if self.current != "file" and sum(map(len, chunks)) > MAX_FIELD_BYTES:
            raise invalid(OPTION_RULES[self.current])

    def on_end(self) -> None:
        self.is_complete = True


def parse_multipart(body: bytes, content_type: str,
                    options: tuple[str, ...] = ("top_k",)) -> tuple[bytes, dict[str, object]]:
    """(the image's bytes, the `options` sent, parsed) from a multipart/form-data body; 4xx `ApiError` for anything
    else."""
    boundary = multipart_boundary(content_type)
    form = FormCollector(options)
    callbacks = {name: getattr(form, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_end")}
    parser = MultipartParser(boundary, callbacks,  # type: ignore[arg-type]
                             max_header_count=MAX_HEADERS_PER_PART, max_header_size=MAX_HEADER_BYTES)
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, "invalid_multipart", f"The multipart body cannot be read ({exc}); "
                                                 "let your HTTP library write it, e.g. `curl -F file=@photo.jpg`.") from None
    if not form.is_complete:
        raise ApiError(400, "invalid_multipart", "The multipart body ends before its closing boundary "
                                                 "(`--boundary--`): send the whole body.")
    if "file" not in form.values:
        raise invalid("the `file` part is missing: send the image as a form field named `file`")
    image = b"".join(form.values["file"])
    if not image:
        raise ApiError(400, "empty_image", "The `file` part is empty: attach the image file's bytes.")
    return image, {name: OPTION_PARSERS[name](b"".join(form.values[name])) for name in options if name in form.values}


def parse_top_k(raw: bytes) -> int:
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_TOP_K:
        raise invalid(f"{OPTION_RULES['top_k']}, not {text[:20]!r}")
    return int(text)


def parse_min_confidence(raw: bytes) -> float:
    text = raw.decode("ascii", errors="replace").strip()
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:  # NaN fails both comparisons
        raise invalid(f"{OPTION_RULES['min_confidence']}, not {text[:20]!r}")
    return value


def parse_encoding_format(raw: bytes) -> str:
    text = raw.decode("ascii", errors="replace").strip()
    if text not in ("float", "base64"):
        raise invalid(f"{OPTION_RULES['encoding_format']}, not {text[:20]!r}")
    return text


OPTION_PARSERS = {"top_k": parse_top_k, "min_confidence": parse_min_confidence,
                  "encoding_format": parse_encoding_format}
OPTION_RULES = {"top_k": f"`top_k` must be a whole number from 1 to {MAX_TOP_K}",
                "min_confidence": "`min_confidence` must be a number from 0 to 1, such as 0.25",
                "encoding_format": "`encoding_format` must be `float` or `base64`"}
