from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.fields import Text

# Endpoints are referenced by name in URLs, so names are URL-safe (as model names are).
ENDPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
EventType = Literal["deletion_request.settled", "deletion_request.due_soon"]


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ENDPOINT_NAME_PATTERN, description="unique in the tenant; how URLs refer to it")
    url: Text = Field(max_length=2000, description="http or https URL the events are POSTed to")
    events: list[EventType] = Field(
        default=["deletion_request.settled", "deletion_request.due_soon"],
        min_length=1,
        max_length=10,
        description="the event types it receives (default: all)",
    )
    secret: Text | None = Field(
        default=None,
        max_length=200,
        description="whsec_<base64 of 24 to 64 random bytes>, the HMAC key of its signatures; omitted: one "
        "is generated and answered once",
    )
    description: Text | None = Field(default=None, max_length=500)


class EndpointOut(BaseModel):
    id: str
    name: str
    url: str
    events: list[str]
    description: str | None
    created_at: datetime
    secret: str | None = Field(
        default=None, description="the generated signing secret: in the answer that created it, never again"
    )


class EndpointPage(BaseModel):
    items: list[EndpointOut]
    next_cursor: str | None


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None = Field(description="the receiver's status; null when it did not answer")
    error: str | None = Field(description="why the attempt failed (non-2xx, timeout, refused, ...)")
    response: str | None = Field(description="the first bytes of the receiver's answer")


class DeliveryOut(BaseModel):
    id: str
    webhook_id: str = Field(description="the event's id: the webhook-id header of every attempt")
    event_type: str
    request_id: str | None
    state: str = Field(description="pending | delivered | failed")
    attempt_count: int
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None = Field(description="when the next attempt is due; null once final")
    retry_until: datetime = Field(
        description="the end of its retry window: an attempt that fails after it fails the delivery"
    )
    delivered_at: datetime | None
    failed_at: datetime | None
    created_at: datetime
    payload: dict[str, Any] = Field(description="the body every attempt sends")
    attempts: list[AttemptOut]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None
