"""The server's log: human-readable lines by default, one JSON object per line with LOG_FORMAT=json.

    2026-11-25 10:12:03,512 INFO classify [req_5f2b...]: POST /v1/classify 200 41.2 ms key=sk-Qm3xTz8b ...
    {"timestamp": "2026-11-25T10:12:03.512Z", "level": "INFO", "logger": "classify.access", "message": "POST ...",
     "request_id": "req_5f2b...", "method": "POST", "route": "/v1/classify", "status": 200, "latency_ms": 41.2, ...}

Every record gets the id of the request it was written for (operations/request_ids.py), or "-" outside a request. Fields
given as `extra={"fields": {...}}` become keys of the JSON object (the per-request line's route, status,
latency, key prefix, model and batch size). Uvicorn's own loggers write through the same handler, and its
access log is turned off: ledger/request_log.py writes one line per request instead, with the id and the key prefix.
Python's warnings, and what libraries print while the model loads (`printed_into_log`), become records too, so
a JSON log holds nothing but JSON; libraries' progress notes at INFO are DEBUG here (`DemoteChatter`).
Nothing here ever sees a key or an image: only the prefix of a key is passed in.
"""

import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import datetime, timezone
from typing import Any, Literal

from operations.request_ids import current_request_id

LogFormat = Literal["text", "json"]
LOG_EVERY_S = 10.0  # a LogSummary's most frequent line
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# Libraries whose INFO records are progress notes: the ONNX exporter's passes (a hundred lines on a first start)
# and the int8 quantizer's per-tensor notes, which it logs on the root logger itself (`logging.info`).
CHATTY_LOGGERS = {"root", "onnx_ir", "onnxscript", "onnxruntime"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get() or "-"
        return True


class DemoteChatter(logging.Filter):
    """CHATTY_LOGGERS' INFO records are DEBUG: shown only when LOG_LEVEL=DEBUG."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name.split(".")[0] in CHATTY_LOGGERS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.level


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: LogFormat) -> None:
    """One handler on the root logger, to stderr; uvicorn's loggers go through it; uvicorn's access log is off."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(DemoteChatter(logging.getLevelName(level)))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
    logging.captureWarnings(True)  # warnings.warn() is otherwise printed to stderr as plain text


@contextmanager
def printed_into_log(logger: logging.Logger, level: int) -> Iterator[None]:
    """What is printed to stdout or stderr while the block runs (a library announcing a download, say) becomes
    one record of `logger` once it ends, instead of plain lines in the middle of the log."""
    printed = io.StringIO()
    try:
        with redirect_stdout(printed), redirect_stderr(printed):
            yield
    finally:
        if text := printed.getvalue().strip():
            logger.log(level, "%s", text)


class LogSummary:
    """A line about what clients did, logged at most once per LOG_EVERY_S with how many times it stands for: a
    flood of connections must not become a flood of log lines."""

    def __init__(self, message: str, level: int = logging.WARNING) -> None:
        self.message = message  # its first %d: how many since the last line
        self.level = level
        self.count = 0
        self.logged_at = -LOG_EVERY_S

    def add(self, *args: object) -> None:
        self.count += 1
        if time.monotonic() - self.logged_at >= LOG_EVERY_S:
            logging.getLogger("classify").log(self.level, self.message, self.count, *args)
            self.count, self.logged_at = 0, time.monotonic()
