"""Who may call what: the bearer-token dependency every route declares with the one scope it needs.

``caller: Annotated[Principal, requires("models:write")]`` authenticates the request (401 without a live
token), checks the scope (403 without it), counts a POST against the client's rate limit (429 beyond it), and
hands the route the caller, whose tenant every lookup is filtered by (another tenant's ids answer 404). The
scheme and each operation's scope are in the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from service.clients.service import SCOPES, Principal, authenticate
from service.core.problems import Forbidden, Unauthenticated
from service.core.rate_limits import RateLimiter
from service.dependencies import SessionDep

bearer = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="lethe.<client id>.<secret>",
    description="An API client's token, from `lethe clients create` (shown once). Each operation names the "
    "scope it needs; `admin` holds them all.",
    auto_error=False,
)


def authorize(
    security_scopes: SecurityScopes,
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    if credentials is None:
        raise Unauthenticated(
            "unauthenticated",
            "this operation needs an Authorization: Bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="lethe"'},
        )
    principal = authenticate(session, credentials.credentials)
    if principal is None:
        raise Unauthenticated(
            "invalid-token",
            "the bearer token is not valid (unknown, rotated or revoked)",
            headers={"WWW-Authenticate": 'Bearer realm="lethe", error="invalid_token"'},
        )
    for scope in security_scopes.scopes:
        if not principal.allows(scope):
            raise Forbidden(
                "insufficient-scope",
                f"this operation needs the scope {scope!r}",
                headers={
                    "WWW-Authenticate": f'Bearer realm="lethe", error="insufficient_scope", scope="{scope}"'
                },
                required_scope=scope,
            )
    if request.method == "POST":
        limiter: RateLimiter = request.app.state.rate_limiter
        limiter.hit(principal.client_id)
    return principal


def requires(scope: str) -> Any:
    """The dependency marker of a route that needs ``scope``."""
    assert scope in SCOPES, scope
    return Security(authorize, scopes=[scope])
