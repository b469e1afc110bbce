from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base, JSONType, new_id, one_of

SETTLED = "deletion_request.settled"
DUE_SOON = "deletion_request.due_soon"
EVENT_TYPES = (SETTLED, DUE_SOON)
# pending: waiting for its next attempt (or in one); delivered: a 2xx answer; failed: no 2xx answer before
# the end of its retry window.
DELIVERY_STATES = ("pending", "delivered", "failed")


class WebhookEndpoint(Base):
    """Where a tenant wants its events POSTed, and which. Named (unique within the tenant) like models. The
    secret signs every delivery (HMAC-SHA256), so it is stored as given, never shown after creation."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (UniqueConstraint("tenant", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSONType)
    secret: Mapped[str] = mapped_column(String(200))  # whsec_<base64 of 24-64 bytes>
    description: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(200))  # the client, as the audit trail names it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEvent(Base):
    """One event of a tenant: its id is the ``webhook-id`` of every delivery of it (each endpoint, each
    retry), and ``payload`` the body they all carry. At most one of each type per deletion request."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        UniqueConstraint("request_id", "type"),
        one_of("type", EVENT_TYPES),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    type: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(ForeignKey("deletion_requests.id"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event to one endpoint: the outbox row the workers send, retried until ``webhook_retry_window_s``
    after ``created_at``."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id"),
        one_of("state", DELIVERY_STATES),
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_id_created_at", "endpoint_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # Attempts started; a worker claims attempt n by raising it to n (and its record must find it still n).
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    # When a worker may take the next attempt: the backoff's end, or a claimed attempt's lease; None: final.
    next_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookAttempt(Base):
    """One POST of a delivery and what came of it."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "number"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)  # None: no answer (timeout, refused, ...)
    error: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)  # the answer's first bytes, as text
