from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response, status

from service.clients.security import requires
from service.clients.service import Principal
from service.core.pagination import NameCursorQuery, TimeCursorQuery
from service.core.settings import Settings
from service.dependencies import LimitQuery, SessionDep, SettingsDep, page_size
from service.webhooks import service
from service.webhooks.schemas import (
    AttemptOut,
    DeliveryOut,
    DeliveryPage,
    EndpointCreate,
    EndpointOut,
    EndpointPage,
)
from service.webhooks.tables import WebhookEndpoint

router = APIRouter(prefix="/webhook-endpoints", tags=["webhooks"])


def _endpoint_out(endpoint: WebhookEndpoint, secret: str | None = None) -> EndpointOut:
    return EndpointOut(
        id=endpoint.id, name=endpoint.name, url=endpoint.url, events=endpoint.events,
        description=endpoint.description, created_at=endpoint.created_at, secret=secret,
    )  # fmt: skip


def _delivery_out(settings: Settings, view: service.DeliveryView) -> DeliveryOut:
    delivery, event = view.delivery, view.event
    return DeliveryOut(
        id=delivery.id, webhook_id=event.id, event_type=event.type, request_id=event.request_id,
        state=delivery.state, attempt_count=delivery.attempt_count, last_attempt_at=delivery.last_attempt_at,
        last_status_code=delivery.last_status_code, last_error=delivery.last_error,
        next_attempt_at=delivery.next_attempt_at, retry_until=service.retry_until(settings, delivery),
        delivered_at=delivery.delivered_at, failed_at=delivery.failed_at, created_at=delivery.created_at,
        payload=event.payload,
        attempts=[
            AttemptOut(number=a.number, started_at=a.started_at, duration_ms=a.duration_ms,
                       status_code=a.status_code, error=a.error, response=a.response)
            for a in view.attempts
        ],
    )  # fmt: skip


@router.post("", status_code=status.HTTP_201_CREATED, response_model=EndpointOut)
def create_endpoint(
    body: EndpointCreate,
    caller: Annotated[Principal, requires("webhooks:write")],
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
) -> EndpointOut:
    """Register an endpoint of the caller's tenant: its URL (http or https), the event types it receives and
    its signing secret. Without a ``secret`` one is generated and answered here, once."""
    created = service.create_endpoint(session, settings, caller, body)
    session.commit()
    response.headers["Location"] = f"/webhook-endpoints/{created.endpoint.name}"
    return _endpoint_out(created.endpoint, created.generated_secret)


@router.get("", response_model=EndpointPage)
def list_endpoints(
    caller: Annotated[Principal, requires("webhooks:read")],
    session: SessionDep,
    settings: SettingsDep,
    cursor: NameCursorQuery = None,
    limit: LimitQuery = None,
) -> EndpointPage:
    """The tenant's endpoints, by name (never their secrets)."""
    page = service.list_endpoints(session, caller.tenant, cursor, page_size(settings, limit))
    return EndpointPage(items=[_endpoint_out(e) for e in page.items], next_cursor=page.next_cursor)


@router.get("/{name}", response_model=EndpointOut)
def get_endpoint(
    name: str, caller: Annotated[Principal, requires("webhooks:read")], session: SessionDep
) -> EndpointOut:
    return _endpoint_out(service.get_endpoint(session, caller.tenant, name))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_endpoint(
    name: str, caller: Annotated[Principal, requires("webhooks:write")], session: SessionDep
) -> Response:
    """The endpoint receives nothing more; its pending deliveries and their record go with it."""
    service.delete_endpoint(session, caller.tenant, name)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{name}/deliveries", response_model=DeliveryPage)
def list_deliveries(
    name: str,
    caller: Annotated[Principal, requires("webhooks:read")],
    session: SessionDep,
    settings: SettingsDep,
    state: str | None = None,
    cursor: TimeCursorQuery = None,
    limit: LimitQuery = None,
) -> DeliveryPage:
    """The endpoint's deliveries newest first (state: pending | delivered | failed), each with its attempts:
    status code or error, when, how long; the next attempt's time; when it was delivered or failed."""
    page = service.list_deliveries(
        session, caller.tenant, name, state=state, cursor=cursor, limit=page_size(settings, limit)
    )
    return DeliveryPage(items=[_delivery_out(settings, v) for v in page.items], next_cursor=page.next_cursor)
