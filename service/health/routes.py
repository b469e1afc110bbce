"""``/healthz`` (the process answers) and ``/readyz`` (it can work: database, broker, store). Both are
unauthenticated and cheap: load balancers, orchestrators and the Dockerfile's HEALTHCHECK call them."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.core.problems import problem_response
from service.dependencies import SessionDep, SettingsDep, StoreDep
from service.health import service

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers (restart it when it does not)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is not ready; ``checks`` say which"}})
def readyz(session: SessionDep, settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """Readiness: the database is reachable and at the migration head, the broker answers, the checkpoint
    store is writable. 503 (a problem with the same ``checks``) when one is not: send no traffic here."""
    checks = {
        "database": service.database(session),
        "broker": service.broker(settings),
        "store": service.store(store),
    }
    body: dict[str, Any] = {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()}
    if all(check.ok for check in checks.values()):
        return JSONResponse({"status": "ready", "checks": body})
    failing = ", ".join(name for name, check in checks.items() if not check.ok)
    return problem_response(
        HTTPStatus.SERVICE_UNAVAILABLE,
        "not-ready",
        f"not ready: {failing}",
        headers={"Retry-After": str(settings.retry_after_seconds)},
        checks=body,
    )
