"""RFC 9457 problem details: every error the API answers is ``application/problem+json``.

Services raise :class:`ProblemError` subclasses carrying a stable ``type`` slug and machine-readable
extension members (e.g. ``sample_ids``); the handlers installed by :func:`install_problem_handlers` render
them. Unexpected exceptions are logged with their traceback and answered as a bare 500 problem, never
with a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "/problems/"
PAYLOAD_TOO_LARGE = "payload-too-large"


class Problem(BaseModel):
    """RFC 9457 problem details, with machine-readable extension members (e.g. ``sample_ids``, ``field``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str


# Documented on every operation: what any of them may answer, always as application/problem+json.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    int(status): {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for status, description in (
        (HTTPStatus.BAD_REQUEST, "the body cannot be decoded (not UTF-8 JSON)"),
        (HTTPStatus.UNAUTHORIZED, "no bearer token, or one that names no live client"),
        (HTTPStatus.FORBIDDEN, "the client lacks the operation's scope"),
        (HTTPStatus.NOT_FOUND, "unknown resource (another tenant's is unknown too)"),
        (HTTPStatus.NOT_ACCEPTABLE, "no representation for the Accept header"),
        (HTTPStatus.CONFLICT, "conflicts with the current state"),
        (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the body is over its limit"),
        (HTTPStatus.UNPROCESSABLE_ENTITY, "invalid input: the members say which"),
        (HTTPStatus.TOO_MANY_REQUESTS, "the client's rate limit is spent: retry after Retry-After seconds"),
        (HTTPStatus.INTERNAL_SERVER_ERROR, "the server's own fault, logged"),
        (HTTPStatus.SERVICE_UNAVAILABLE, "the server cannot answer as configured"),
    )
}


class ProblemError(Exception):
    """An error with an HTTP status, a stable slug (the problem ``type``) and extension members."""

    status: int = HTTPStatus.BAD_REQUEST

    def __init__(
        self, slug: str, detail: str, *, headers: Mapping[str, str] | None = None, **extensions: Any
    ) -> None:
        super().__init__(detail)
        self.slug = slug
        self.detail = detail
        self.headers = headers
        self.extensions = extensions


class InvalidInput(ProblemError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY


# Problems name at most this many offending values; ``count`` always gives the full number.
MAX_LISTED_VALUES = 100


def listed_problem(
    slug: str,
    detail: str,
    key: str,
    values: Sequence[object],
    *,
    problem: type[ProblemError] | None = None,
    **extensions: Any,
) -> ProblemError:
    """A problem (422 unless ``problem`` says otherwise) listing the offending values under ``key`` (e.g.
    ``sample_ids``), with their count."""
    members: dict[str, Any] = {key: list(values[:MAX_LISTED_VALUES]), "count": len(values), **extensions}
    return (problem or InvalidInput)(slug, f"{len(values)} {detail}", **members)


class Unauthenticated(ProblemError):
    """No credentials, or credentials that name no live client (RFC 6750: with ``WWW-Authenticate``)."""

    status = HTTPStatus.UNAUTHORIZED


class Forbidden(ProblemError):
    status = HTTPStatus.FORBIDDEN


class TooManyRequests(ProblemError):
    status = HTTPStatus.TOO_MANY_REQUESTS


class NotFound(ProblemError):
    status = HTTPStatus.NOT_FOUND


class Conflict(ProblemError):
    status = HTTPStatus.CONFLICT


class Gone(ProblemError):
    """The resource existed and was deleted for good (a purged checkpoint): its tombstone answers."""

    status = HTTPStatus.GONE


class PayloadTooLarge(ProblemError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotAcceptable(ProblemError):
    status = HTTPStatus.NOT_ACCEPTABLE


class Unavailable(ProblemError):
    """The server cannot answer as configured (e.g. no report-signing key): an operator must act."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class ServerFault(ProblemError):
    """The server's own fault, named (e.g. a corrupt stored checkpoint); logged where it is raised."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


def problem_body(status: int, slug: str, detail: str, **extensions: Any) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE_BASE + slug,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **jsonable_encoder(extensions),
    }


def problem_response(
    status: int, slug: str, detail: str, headers: Mapping[str, str] | None = None, **extensions: Any
) -> JSONResponse:
    body = problem_body(status, slug, detail, **extensions)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


async def _handle_problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(exc.status, exc.slug, exc.detail, headers=exc.headers, **exc.extensions)


async def _handle_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
        for error in exc.errors()
    ]
    if any(error["type"] == "json_invalid" for error in errors):
        detail = "the body is not valid JSON"
    else:
        fields = sorted({".".join(str(part) for part in error["loc"][1:]) for error in errors})
        detail = f"the request does not match the schema: {', '.join(fields) or 'body'}"
    return problem_response(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid-request", detail, errors=errors)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path. Starlette's 405 names only the first route
    that matched the path, and a path often has two (``GET`` and ``POST /models``)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _child = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = (
        PAYLOAD_TOO_LARGE
        if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        else HTTPStatus(exc.status_code).phrase.lower().replace(" ", "-")
    )
    headers = dict(exc.headers or {})
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return problem_response(exc.status_code, slug, str(exc.detail), headers=headers or None)


async def _handle_integrity(request: Request, exc: Exception) -> JSONResponse:
    # Checks run before writes, so this is a race lost to a concurrent request (e.g. two POSTs of one name).
    logger.warning("integrity error on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        HTTPStatus.CONFLICT, "conflict", "the request conflicts with a concurrent change; read and retry"
    )


async def _handle_data(request: Request, exc: Exception) -> JSONResponse:
    # A value the database cannot hold or compare (a NUL in a path or query parameter, an integer beyond its
    # range) that no schema caught: the client's input, and the transaction is rolled back with the session.
    logger.warning("data error on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        HTTPStatus.UNPROCESSABLE_ENTITY,
        "invalid-value",
        "a value in the request cannot be stored or compared (a NUL character, an out-of-range number)",
    )


def _unavailable(request: Request, slug: str, detail: str, exc: Exception) -> JSONResponse:
    """503 with Retry-After: the request was not carried out (nothing written); the client retries."""
    logger.warning("%s on %s %s: %s", slug, request.method, request.url.path, exc)
    retry_after = getattr(request.app.state.settings, "retry_after_seconds", 5)
    return problem_response(
        HTTPStatus.SERVICE_UNAVAILABLE, slug, detail, headers={"Retry-After": str(retry_after)}
    )


async def _handle_database_down(request: Request, exc: Exception) -> JSONResponse:
    # The database is unreachable (restarting, failing over).
    return _unavailable(
        request, "database-unavailable",
        "the database cannot be reached right now; nothing was recorded: retry after the given delay", exc,
    )  # fmt: skip


async def _handle_busy(request: Request, exc: Exception) -> JSONResponse:
    # Every database connection of this process is in use: more requests than it can serve.
    return _unavailable(
        request, "server-busy",
        "the server is at capacity; nothing was recorded: retry after the given delay", exc,
    )  # fmt: skip


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        HTTPStatus.INTERNAL_SERVER_ERROR, "internal-error", "an unexpected error occurred; it has been logged"
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _handle_problem)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(IntegrityError, _handle_integrity)
    app.add_exception_handler(DataError, _handle_data)
    app.add_exception_handler(OperationalError, _handle_database_down)
    app.add_exception_handler(InterfaceError, _handle_database_down)
    app.add_exception_handler(PoolTimeout, _handle_busy)
    app.add_exception_handler(Exception, _handle_unexpected)
