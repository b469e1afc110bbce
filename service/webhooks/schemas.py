from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.fields import Text

# Endpoints are referenced by name in URLs, so names are URL-safe (as model names are).
ENDPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# What the service accepts as a webhook URL (``webhooks.service`` checks it, and the URL parsers' view of it):
# stated in the document, so a URL that matches it is one the service takes (where its host may go aside).
_HEX = "[0-9A-Fa-f]{1,4}"
_IPV6 = (
    f"({_HEX}:){{7}}{_HEX}|({_HEX}:){{1,7}}:|({_HEX}:){{1,6}}:{_HEX}|({_HEX}:){{1,5}}(:{_HEX}){{1,2}}"
    f"|({_HEX}:){{1,4}}(:{_HEX}){{1,3}}|({_HEX}:){{1,3}}(:{_HEX}){{1,4}}|({_HEX}:){{1,2}}(:{_HEX}){{1,5}}"
    f"|{_HEX}:((:{_HEX}){{1,6}})|:((:{_HEX}){{1,7}}|:)"
)
_PORT = "6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}"
_HOST = r"[A-Za-z0-9._~!$&'()*+,;=-]+|\[(" + _IPV6 + r")\]"
_PATH_AND_QUERY = '[/?][!-"$-~]*'  # printable ASCII but '#' (no fragment)
WEBHOOK_URL_PATTERN = f"^[Hh][Tt][Tt][Pp][Ss]?://({_HOST})(:({_PORT}))?({_PATH_AND_QUERY})?$"
EventType = Literal["deletion_request.settled", "deletion_request.due_soon"]


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ENDPOINT_NAME_PATTERN, description="unique in the tenant; how URLs refer to it")
    # The pattern is stated in the document and checked by the service, whose refusal says what is wrong.
    url: Text = Field(
        max_length=2000,
        json_schema_extra={"pattern": WEBHOOK_URL_PATTERN},
        description="http or https URL the events are POSTed to: a host name (an internationalised one in "
        "its punycode form), IPv4 or bracketed IPv6 address, an optional port, path and query; no "
        "credentials, fragment, whitespace or control characters",
    )
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
