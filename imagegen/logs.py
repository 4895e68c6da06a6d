"""Logging: one JSON object per line (python-json-logger), each carrying the request id it belongs to."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

_request_id: ContextVar[str] = ContextVar("request_id", default="")
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id() -> str:
    """The current request's id (set by the middleware from X-Request-ID, or generated)."""
    return _request_id.get()


def accept_request_id(incoming: str | None) -> str:
    """Keep a caller's X-Request-ID when it is sane, else make one; bind it to this context."""
    rid = incoming if incoming and _VALID_ID.fullmatch(incoming) else uuid.uuid4().hex
    _request_id.set(rid)
    return rid


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = _request_id.get() or None
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{request_id}",
                style="{",
                datefmt="%Y-%m-%dT%H:%M:%S%z",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # one format for everything; our middleware writes the access log
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
