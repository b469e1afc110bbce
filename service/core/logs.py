"""Logs one JSON object a line, each carrying the context it was written in: the HTTP request id (an
incoming ``X-Request-ID`` kept, else generated; echoed on the answer), and in a job's life its job id, model
and deletion request ids, in the API and in the worker. The standard library's logging, with this formatter
and a filter that adds the context: a handful of lines, where a logging library would add a dependency."""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
# Replaced, never mutated: a context's fields are a new dict each time they change.
_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("lethe_log_context", default=None)
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# LogRecord attributes that are not "extra" fields a call passed.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def current_context() -> dict[str, Any]:
    return dict(_CONTEXT.get() or {})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every line logged inside carries ``fields`` (None values are left out)."""
    token = _CONTEXT.set({**current_context(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` to the current context until it ends (e.g. a request's ids once they are known)."""
    _CONTEXT.set({**current_context(), **{k: v for k, v in fields.items() if v is not None}})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "context", {}),
            **{k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and k != "context"},
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class _AddContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _CONTEXT.get() or {}
        return True


def configure(log_format: str, level: str = "INFO") -> None:
    """The root logger writes to stderr, as JSON lines (``json``) or plain text (``text``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_AddContext())
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RequestIds:
    """ASGI middleware: the request's id into the log context and onto the answer, and one access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger("lethe.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                ]
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                method, path = scope["method"], scope["path"]
                fields = {"method": method, "path": path, "status": status[0]}
                self.log.info("%s %s %d", method, path, status[0], extra=fields)
