"""Request body limits, enforced before a route reads the body: ``Content-Length`` beyond the limit is refused
at once, and a body sent without one (chunked) is cut off once it passes the limit. 413 problem either way."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.problems import PAYLOAD_TOO_LARGE, problem_response
from service.core.settings import Settings


class BodyLimit:
    """At most ``settings.max_body_bytes`` for every body but multipart uploads, which may carry a
    checkpoint (``max_checkpoint_bytes``) plus a little for the form's other fields."""

    FORM_OVERHEAD = 1024**2

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        multipart = headers.get("content-type", "").startswith("multipart/form-data")
        settings = self.settings
        limit = settings.max_checkpoint_bytes + self.FORM_OVERHEAD if multipart else settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body parsing, which re-raises HTTP exceptions as they are.
                    raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _detail(limit))
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = problem_response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, PAYLOAD_TOO_LARGE, _detail(limit))
        await response(scope, receive, send)


def _detail(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


# Liveness and scraping answer at once, however busy the process is.
UNQUEUED_PATHS = frozenset({"/healthz", "/metrics"})


class ConcurrencyLimit:
    """At most ``limit`` requests inside the app at once; the others wait here, before they hold anything.

    A request of this API hops between the event loop and the thread pool several times (its dependencies,
    its handler) and holds its database connection, and for a deletion request its model's row lock, from
    the first hop to the last. Without a bound, every request admitted took a connection and then queued
    for the interpreter, so that under overload the pool ran dry and throughput fell; with one, the excess
    waits on the event loop at no cost and the admitted requests finish at full speed.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self._slots = asyncio.Semaphore(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNQUEUED_PATHS:
            await self.app(scope, receive, send)
            return
        async with self._slots:
            await self.app(scope, receive, send)
