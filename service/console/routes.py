"""The console's pages and downloads, a sub-application mounted at ``/console`` by ``create_app``.

Signed in with an API client's token (checked once; then a signed cookie names the client: ``sessions.py``),
each page checks the scope the API operation it mirrors needs (``Principal.allows``, the check
``service.clients.security`` makes) and reads the caller's tenant only. Report and checkpoint downloads call
the API's own route functions with the signed-in client, so they sign, record and answer exactly as the API
does. Errors are HTML pages; every answer carries a strict Content-Security-Policy (no inline script or
style: the JavaScript and CSS are files of ``static/``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from http import HTTPStatus
from importlib import resources
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.clients.service import SCOPES, Principal, authenticate
from service.console import service, sessions
from service.console.sessions import ConsoleSession
from service.core.clock import utcnow
from service.core.problems import Forbidden, InvalidInput, ProblemError
from service.dependencies import SessionDep, SettingsDep, StoreDep
from service.models.routes import download_checkpoint
from service.reports import routes as report_routes
from service.reports.tables import ErasureReport

logger = logging.getLogger(__name__)

PACKAGE = resources.files("service.console")
templates = Jinja2Templates(directory=str(PACKAGE / "templates"))


def _when(value: datetime | str | None) -> str:
    """A moment as a person reads it, in UTC (the API's ISO strings and datetimes alike)."""
    if value is None:
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _days(days: float) -> str:
    if days < 0:
        return f"overdue by {math.ceil(-days)} day{'s' if math.ceil(-days) != 1 else ''}"
    whole = math.floor(days)
    return "due within a day" if whole == 0 else f"{whole} day{'s' if whole != 1 else ''}"


def _days_until(value: str, now: datetime) -> str:
    return _days((datetime.fromisoformat(value) - now).total_seconds() / 86_400)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


templates.env.filters.update(when=_when, days=_days, days_until=_days_until, num=_number)
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),  # pages name data subjects: no copy in shared caches or history
    (b"cross-origin-resource-policy", b"same-origin"),  # no other site embeds what the console serves
]

router = APIRouter()


class SignInRequired(Exception):
    pass


def _base(request: Request) -> str:
    """Where the console is mounted (``/console``, under any root path the API is served at)."""
    return str(request.scope.get("root_path", ""))


def _current(request: Request, session: SessionDep) -> ConsoleSession | None:
    return sessions.read(
        request.app.state.console_secret, session, request.cookies.get(sessions.SESSION_COOKIE)
    )


def _signed_in(current: Annotated[ConsoleSession | None, Depends(_current)]) -> ConsoleSession:
    if current is None:
        raise SignInRequired
    return current


SignedIn = Annotated[ConsoleSession, Depends(_signed_in)]


def _require(current: ConsoleSession, scope: str) -> Principal:
    """The caller, if its client holds ``scope`` (the API's rule: ``admin`` holds every scope)."""
    assert scope in SCOPES, scope
    if not current.principal.allows(scope):
        raise Forbidden("insufficient-scope", f"this page needs the scope {scope!r}", required_scope=scope)
    return current.principal


def _same_origin(request: Request) -> bool:
    """A state-changing form must come from the console's own pages (with the CSRF token, below)."""
    origin = request.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1] == request.headers.get("host")


def _own_pages_only(request: Request) -> None:
    """A download signs and records (the trail's ``report.downloaded``): only the console's own pages may
    start one, not a link or image on another site, which the Lax cookie would otherwise follow. Browsers say
    where a request comes from (Fetch Metadata); a client without the header is no browser to abuse."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden("cross-site", "downloads start from the console's own pages")


OwnPagesOnly = Depends(_own_pages_only)


def _check_csrf(request: Request, current: ConsoleSession, token: str | None) -> None:
    if not _same_origin(request) or not sessions.csrf_matches(current.csrf_token, token):
        raise Forbidden("csrf", "the form's CSRF token is missing or wrong: reload the page and try again")


def _render(
    request: Request,
    name: str,
    current: ConsoleSession | None,
    context: dict[str, Any],
    status_code: int = HTTPStatus.OK,
) -> Response:
    principal = current.principal if current else None
    base = _base(request)
    return templates.TemplateResponse(
        request,
        name,
        {
            "base": base,
            "api_root": base.removesuffix("/console"),
            "principal": principal,
            "csrf_token": current.csrf_token if current else None,
            "can": (lambda scope: principal is not None and principal.allows(scope)),
            "path": request.url.path,
            **context,
        },
        status_code=status_code,
    )


def _safe_next(request: Request, target: str | None) -> str:
    """Only a path of the console itself: never another site (an open redirect)."""
    base = _base(request)
    if target and target.startswith(base + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{base}/requests"


@router.get("/", include_in_schema=False)
def home(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{_base(request)}/requests", status_code=HTTPStatus.SEE_OTHER)


@router.get("/sign-in")
def sign_in_form(
    request: Request, current: Annotated[ConsoleSession | None, Depends(_current)], next: str | None = None
) -> Response:
    if current is not None:
        return RedirectResponse(_safe_next(request, next), status_code=HTTPStatus.SEE_OTHER)
    return _sign_in_page(request, next, None, HTTPStatus.OK)


def _sign_in_page(request: Request, next_path: str | None, error: str | None, status_code: int) -> Response:
    form_token = sessions.new_form_token()
    response = _render(
        request,
        "sign_in.html",
        None,
        {"form_token": form_token, "next": _safe_next(request, next_path), "error": error,
         "signed_out": request.query_params.get("signed-out") is not None},
        status_code,
    )  # fmt: skip
    _set_cookie(request, response, sessions.SIGN_IN_COOKIE, form_token, max_age=3600, strict=True)
    return response


def _set_cookie(
    request: Request, response: Response, name: str, value: str, *, max_age: int, strict: bool = False
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=_base(request) or "/",
        httponly=True,  # no script of any page can read it
        secure=request.url.scheme == "https",
        samesite="strict" if strict else "lax",
    )


@router.post("/sign-in")
def sign_in(
    request: Request,
    session: SessionDep,
    token: Annotated[str, Form(max_length=200)],
    form_token: Annotated[str, Form(max_length=100)],
    next: Annotated[str | None, Form(max_length=2000)] = None,
) -> Response:
    """Check the token once, as the API does (``authenticate``), and keep only a signed session cookie."""
    cookie = request.cookies.get(sessions.SIGN_IN_COOKIE)
    if not _same_origin(request) or cookie is None or not sessions.csrf_matches(cookie, form_token):
        return _sign_in_page(
            request, next, "The sign-in form expired: please sign in again.", HTTPStatus.FORBIDDEN
        )
    principal = authenticate(session, token.strip())
    if principal is None:
        return _sign_in_page(
            request, next, "That token is not valid (unknown, rotated or revoked).", HTTPStatus.UNAUTHORIZED
        )
    value = sessions.issue(request.app.state.console_secret, session, principal)
    logger.info("console sign-in of client %s", principal.name)
    response = RedirectResponse(_safe_next(request, next), status_code=HTTPStatus.SEE_OTHER)
    _set_cookie(request, response, sessions.SESSION_COOKIE, value, max_age=sessions.SESSION_SECONDS)
    response.delete_cookie(sessions.SIGN_IN_COOKIE, path=_base(request) or "/")
    return response


@router.post("/sign-out")
def sign_out(
    request: Request, current: SignedIn, csrf: Annotated[str | None, Form(max_length=100)] = None
) -> Response:
    _check_csrf(request, current, csrf)
    response = RedirectResponse(f"{_base(request)}/sign-in?signed-out", status_code=HTTPStatus.SEE_OTHER)
    response.delete_cookie(sessions.SESSION_COOKIE, path=_base(request) or "/", httponly=True)
    return response


def _date(value: str | None, field: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput("invalid-date", f"{field} must be a date (YYYY-MM-DD)", field=field) from exc


@router.get("/requests")
def work_queue(
    request: Request,
    current: SignedIn,
    session: SessionDep,
    state: str = service.OPEN,
    model: str | None = None,
    verdict: str | None = None,
    due_from: str | None = None,
    due_to: str | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    """Open deletion requests (or those the filters choose), earliest due date first, a page at a time."""
    principal = _require(current, "deletions:read")
    if state not in (service.OPEN, "all", *service.REQUEST_STATES):
        raise InvalidInput("unknown-state", f"no request state {state!r}", field="state")
    filters = service.QueueFilters(
        state=state,
        model=model or None,
        verdict=verdict or None,
        due_from=_date(due_from, "due_from"),
        due_to=_date(due_to, "due_to"),
    )
    queue = service.work_queue(session, principal.tenant, filters, utcnow(), page)

    def page_link(number: int) -> str:
        query = {**request.query_params, "page": str(number)}
        return f"{_base(request)}/requests?{urlencode(query)}"

    pages = {
        "previous": page_link(page - 1) if page > 1 else None,
        "next": page_link(page + 1) if queue.first + len(queue.rows) <= queue.total else None,
    }
    return _render(
        request,
        "queue.html",
        current,
        {"queue": queue, "filters": filters, "states": service.REQUEST_STATES,
         "verdicts": sorted(queue.verdicts), "buckets": service.DAYS_LEFT_BUCKETS,
         "at_risk_buckets": service.AT_RISK_BUCKETS, "filtered": bool(request.query_params), "pages": pages},
    )  # fmt: skip


@router.get("/verify")
def verify_page(request: Request, current: SignedIn) -> Response:
    """Check a report and signature someone was handed, in the browser (the files are not uploaded)."""
    return _render(request, "verify.html", current, {})


@router.get("/requests/{request_id}")
def request_page(request: Request, request_id: str, current: SignedIn, session: SessionDep) -> Response:
    principal = _require(current, "deletions:read")
    page = service.request_page(session, request_id, principal)
    context = {"page": page, "now": utcnow(), "verdict_words": service.verdict_words()}
    return _render(request, "request.html", current, context)


@router.get("/requests/{request_id}/evidence/{index}/{kind}.svg", dependencies=[OwnPagesOnly])
def evidence_figure(
    request_id: str, index: int, kind: str, current: SignedIn, session: SessionDep
) -> Response:
    principal = _require(current, "reports:read")
    body = service.evidence_svg(session, request_id, principal.tenant, index, kind)
    return Response(body, media_type="image/svg+xml")


def _attachment(response: Response, filename: str) -> Response:
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@router.get("/requests/{request_id}/report.sig", dependencies=[OwnPagesOnly])
def report_signature(
    request: Request, request_id: str, current: SignedIn, session: SessionDep, settings: SettingsDep
) -> Response:
    """The detached signature document, with the time the service signed the report beside it."""
    caller = _require(current, "reports:read")
    document = report_routes.get_report_signature(request_id, caller, session, settings, request)
    report = session.get(ErasureReport, request_id)
    signed_at = report.signed_at.isoformat() if report is not None and report.signed_at else ""
    answer = JSONResponse(document, headers={"Lethe-Signed-At": signed_at})
    return _attachment(answer, f"erasure-report-{request_id}.sig")


# After report.sig: a path parameter would take "sig" as an extension too.
@router.get("/requests/{request_id}/report.{extension}", dependencies=[OwnPagesOnly])
def report_file(
    request: Request,
    request_id: str,
    extension: Literal["json", "pdf"],
    current: SignedIn,
    session: SessionDep,
    settings: SettingsDep,
) -> Response:
    """The signed bytes or their PDF, as the API serves them (and recorded in the trail as a download, as
    there)."""
    caller = _require(current, "reports:read")
    serve = report_routes.get_report_json if extension == "json" else report_routes.get_report_pdf
    answer = serve(request_id, caller, session, settings, request)
    return _attachment(answer, f"erasure-report-{request_id}.{extension}")


@router.get("/models")
def models_page(request: Request, current: SignedIn, session: SessionDep) -> Response:
    principal = _require(current, "models:read")
    return _render(request, "models.html", current, {"models": service.models(session, principal.tenant)})


@router.get("/models/{name}")
def model_page(request: Request, name: str, current: SignedIn, session: SessionDep) -> Response:
    principal = _require(current, "models:read")
    page = service.model_page(session, name, principal, utcnow())
    return _render(request, "model.html", current, {"page": page})


@router.get("/models/{name}/versions/{number}/checkpoint", dependencies=[OwnPagesOnly])
def checkpoint(name: str, number: int, current: SignedIn, session: SessionDep, store: StoreDep) -> Response:
    return download_checkpoint(name, number, _require(current, "models:read"), session, store)


@router.get("/jobs/{job_id}/progress")
def job_progress(job_id: str, current: SignedIn, session: SessionDep) -> dict[str, Any]:
    principal = _require(current, "jobs:read")
    return asdict(service.job_progress(session, job_id, principal.tenant, utcnow()))


@dataclass(frozen=True)
class _MountedRoute:
    path: str


class ConsoleFrame:
    """Every answer of the console, pages, files and errors alike, carries the headers above; and the API's
    request metrics (``service.metrics.http``, outside the mount) label it with its full path template
    (``/console/requests/{request_id}``), not the sub-application's own (``/requests/{request_id}``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        finally:
            path = getattr(scope.get("route"), "path", None)
            if path:
                scope["route"] = _MountedRoute(scope.get("root_path", "") + path)


def _error_page(request: Request, status_code: int, detail: str) -> Response:
    session_factory = request.app.state.session_factory
    with session_factory() as session:  # the signed-in client's name in the header, if any
        current = sessions.read(
            request.app.state.console_secret, session, request.cookies.get(sessions.SESSION_COOKIE)
        )
    return _render(
        request,
        "error.html",
        current,
        {"status": status_code, "title": HTTPStatus(status_code).phrase, "detail": detail},
        status_code,
    )


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return _error_page(request, exc.status, exc.detail)


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return _error_page(request, exc.status_code, str(exc.detail))


async def _invalid(request: Request, _exc: Exception) -> Response:
    return _error_page(
        request, HTTPStatus.UNPROCESSABLE_ENTITY, "The address holds a value the page cannot use."
    )


async def _sign_in_required(request: Request, _exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = urlencode({"next": target}, quote_via=quote)
    return RedirectResponse(f"{_base(request)}/sign-in?{query}", status_code=HTTPStatus.SEE_OTHER)


def create_console(api: FastAPI) -> FastAPI:
    """The console application, sharing the API's database sessions, settings and store."""
    console = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    for name in ("settings", "session_factory", "store", "rate_limiter", "dispatcher"):
        setattr(console.state, name, getattr(api.state, name))
    console.state.console_secret = sessions.server_secret(api.state.settings.report_key_dir)
    console.include_router(router)
    console.mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static")
    console.add_exception_handler(ProblemError, _problem)
    console.add_exception_handler(StarletteHTTPException, _http)
    console.add_exception_handler(RequestValidationError, _invalid)
    console.add_exception_handler(SignInRequired, _sign_in_required)
    console.add_middleware(ConsoleFrame)
    return console
