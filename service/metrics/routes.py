"""``GET /metrics``: Prometheus text format. Unauthenticated like the health probes (a scraper calls it); it
holds aggregates only, no tenant's names or ids."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Requests by route and status with latency; deletion requests by state; queue depth and the age of its
    oldest job; jobs by state; audit verdicts; open requests by days left until their due date."""
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
