"""Queries on webhook endpoints, events, deliveries and attempts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from service.datasets.tables import Dataset
from service.deletion_requests.tables import DeletionRequest
from service.webhooks.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent


def add(session: Session, *rows: object) -> None:
    session.add_all(rows)
    session.flush()


def get_endpoint(session: Session, tenant: str, name: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant, WebhookEndpoint.name == name)
    )


def get_endpoint_by_id(session: Session, endpoint_id: str) -> WebhookEndpoint | None:
    return session.get(WebhookEndpoint, endpoint_id)


def list_endpoints(session: Session, tenant: str, after: str | None, limit: int) -> Sequence[WebhookEndpoint]:
    query = (
        select(WebhookEndpoint)
        .where(WebhookEndpoint.tenant == tenant)
        .order_by(WebhookEndpoint.name)
        .limit(limit)
    )
    if after is not None:
        query = query.where(WebhookEndpoint.name > after)
    return session.scalars(query).all()


def subscribed_endpoints(
    session: Session, event_type: str, tenant: str | None = None
) -> Sequence[WebhookEndpoint]:
    """Endpoints subscribed to ``event_type`` (of one tenant, or of every tenant), in a stable order."""
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.tenant, WebhookEndpoint.name)
    if tenant is not None:
        query = query.where(WebhookEndpoint.tenant == tenant)
    # The subscription is a short JSON list: filtered here, the same way on Postgres and SQLite.
    return [endpoint for endpoint in session.scalars(query) if event_type in endpoint.events]


def delete_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint with its deliveries and their attempts (events stay: other endpoints share them)."""
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint.id)
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
    session.delete(endpoint)
    session.flush()


def event_of_request(session: Session, request_id: str, event_type: str) -> WebhookEvent | None:
    return session.scalar(
        select(WebhookEvent).where(WebhookEvent.request_id == request_id, WebhookEvent.type == event_type)
    )


def get_event(session: Session, event_id: str) -> WebhookEvent | None:
    return session.get(WebhookEvent, event_id)


def events_by_id(session: Session, event_ids: Sequence[str]) -> dict[str, WebhookEvent]:
    if not event_ids:
        return {}
    rows = session.scalars(select(WebhookEvent).where(WebhookEvent.id.in_(event_ids)))
    return {event.id: event for event in rows}


def endpoint_ids_with_delivery(session: Session, event_id: str) -> set[str]:
    query = select(WebhookDelivery.endpoint_id).where(WebhookDelivery.event_id == event_id)
    return set(session.scalars(query))


def open_requests_due_by(
    session: Session, tenants: Sequence[str], horizon: datetime, *, limit: int, offset: int = 0
) -> Sequence[tuple[DeletionRequest, str]]:
    """Processing requests of these tenants due at or before ``horizon`` (earliest first), each with its
    tenant (its dataset's)."""
    if not tenants:
        return []
    rows = session.execute(
        select(DeletionRequest, Dataset.tenant)
        .join(Dataset, Dataset.id == DeletionRequest.dataset_id)
        .where(
            DeletionRequest.state == "processing",
            DeletionRequest.due_at <= horizon,
            Dataset.tenant.in_(tenants),
        )
        .order_by(DeletionRequest.due_at, DeletionRequest.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return [(request, tenant) for request, tenant in rows]


def list_deliveries(
    session: Session,
    endpoint_id: str,
    *,
    state: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> Sequence[WebhookDelivery]:
    """An endpoint's deliveries newest first, ties broken by id (keyset pagination: ``before`` = last key)."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(WebhookDelivery.state == state)
    if before is not None:
        created_at, delivery_id = before
        query = query.where(
            or_(
                WebhookDelivery.created_at < created_at,
                (WebhookDelivery.created_at == created_at) & (WebhookDelivery.id < delivery_id),
            )
        )
    return session.scalars(query).all()


def attempts_of(session: Session, delivery_ids: Sequence[str]) -> dict[str, list[WebhookAttempt]]:
    found: dict[str, list[WebhookAttempt]] = defaultdict(list)
    if delivery_ids:
        rows = session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(delivery_ids))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number)
        )
        for attempt in rows:
            found[attempt.delivery_id].append(attempt)
    return found


def due_candidates(session: Session, now: datetime, limit: int) -> Sequence[tuple[str, str]]:
    """(delivery id, endpoint id) of pending deliveries whose next attempt is due, oldest first; unlocked."""
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    ).all()
    return [(delivery_id, endpoint_id) for delivery_id, endpoint_id in rows]


def lock_due(session: Session, delivery_ids: Sequence[str], now: datetime) -> Sequence[WebhookDelivery]:
    """Those of ``delivery_ids`` still due, locked for this transaction; rows another transaction holds are
    skipped (Postgres ``FOR UPDATE SKIP LOCKED``; SQLite has one writer and no row locks, and SQLAlchemy
    leaves the clause out there)."""
    if not delivery_ids:
        return []
    return session.scalars(
        select(WebhookDelivery)
        .where(
            WebhookDelivery.id.in_(delivery_ids),
            WebhookDelivery.state == "pending",
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()


def lock_delivery(session: Session, delivery_id: str) -> WebhookDelivery | None:
    return session.get(WebhookDelivery, delivery_id, with_for_update=True, populate_existing=True)


def delete_events_before(session: Session, cutoff: datetime) -> int:
    old_events = select(WebhookEvent.id).where(WebhookEvent.created_at < cutoff)
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.event_id.in_(old_events))
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.event_id.in_(old_events)))
    result = session.execute(delete(WebhookEvent).where(WebhookEvent.created_at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)
