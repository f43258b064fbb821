"""The server's log: human-readable lines by default, one JSON object per line with LOG_FORMAT=json.

    2026-11-25 10:12:03,512 INFO classify [req_5f2b...]: POST /v1/classify 200 41.2 ms key=sk-Qm3xTz8b ...
    {"timestamp": "2026-11-25T10:12:03.512Z", "level": "INFO", "logger": "classify.access", "message": "POST ...",
     "request_id": "req_5f2b...", "method": "POST", "route": "/v1/classify", "status": 200, "latency_ms": 41.2, ...}

Every record gets the id of the request it was written for (requestid.py), or "-" outside a request. Fields
given as `extra={"fields": {...}}` become keys of the JSON object (the per-request line's route, status,
latency, key prefix, model and batch size). Uvicorn's own loggers write through the same handler, and its
access log is turned off: requestlog.py writes one line per request instead, with the id and the key prefix.
Nothing here ever sees a key or an image: only the prefix of a key is passed in.
"""

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Literal

from requestid import current_request_id

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get() or "-"
        return True


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
