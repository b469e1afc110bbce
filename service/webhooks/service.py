"""Webhooks: endpoints (a tenant's, by name), events written into the outbox in the transaction that makes
them true, and the rules of delivery (claim, sign, record, back off) that ``worker/webhooks.py`` runs.
Never commits.

An event has one id, the ``webhook-id`` of each of its deliveries (one per endpoint) and of every retry, so a
receiver drops duplicates by it. Deliveries are at least once: a worker claims an attempt by raising the
delivery's ``attempt_count`` and moving ``next_attempt_at`` to the end of a lease (so no other worker takes
it meanwhile), sends it outside any transaction, and records the outcome only if the delivery still awaits
that attempt. A delivery that has no 2xx answer by the end of the retry window is failed.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import random
import re
import secrets
import socket
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from service.clients.service import Principal
from service.core.pagination import (
    Page,
    decode_name_key,
    decode_time_key,
    encode_name_cursor,
    encode_time_cursor,
    page_from_rows,
)
from service.core.problems import Conflict, InvalidInput, NotFound
from service.core.settings import Settings
from service.datasets import repository as datasets_repository
from service.deletion_requests.tables import DeletionRequest
from service.erasures import repository as erasures_repository
from service.models import repository as models_repository
from service.trail import service as trail
from service.webhooks import repository
from service.webhooks.schemas import WEBHOOK_URL_PATTERN, EndpointCreate
from service.webhooks.tables import (
    DELIVERY_STATES,
    DUE_SOON,
    SETTLED,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)

SECRET_PREFIX = "whsec_"
_SECRET_PATTERN = re.compile(r"^whsec_[A-Za-z0-9+/]+={0,2}$")
_SECRET_BYTES = (24, 64)  # what the Standard Webhooks specification asks of a symmetric secret
_SCHEMES = ("http", "https")
USER_AGENT = "Lethe-Webhooks/0.1"
RESPONSE_EXCERPT = 1000  # characters of a receiver's answer kept with the attempt
_DUE_SOON_PAGE = 500


# Endpoints -------------------------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _checked_url(url: str) -> str:
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port out of range or not a number)
        httpx.URL(url)
    except Exception:  # urlsplit's ValueError, httpx's InvalidURL, IDNA's UnicodeError...
        problem = "is not a valid URL"
    else:
        if parts.scheme.lower() not in _SCHEMES:
            problem = "must be an http or https URL"
        elif not parts.hostname:
            problem = "must name a host"
        elif parts.username is not None or parts.password is not None:
            problem = "must not carry credentials (use the signature to authenticate Lethe)"
        elif parts.fragment:
            problem = "must not have a fragment"
        elif any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            problem = "must not contain whitespace or control characters"
        elif not re.fullmatch(WEBHOOK_URL_PATTERN, url):
            problem = (
                "must be ASCII: a host name (an internationalised one in its punycode form), an IPv4 or a "
                "bracketed IPv6 address, then an optional port, path and query"
            )
    if problem is not None:
        raise InvalidInput("invalid-url", f"the webhook URL {problem}", field="url", schemes=list(_SCHEMES))
    return url


def private_address(url: str) -> str | None:
    """The first address ``url``'s host resolves to that is not on the public internet (loopback, private,
    link-local such as a cloud's metadata service, reserved), or None. A host that does not resolve is None:
    its delivery fails and is retried like any unreachable receiver."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return None
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            return address
    return None


def _checked_host(settings: Settings, url: str) -> None:
    """Webhooks go to the public internet unless the deployment allows private hosts: a client must not make
    the workers POST to the service's own network (SSRF)."""
    if settings.webhook_allow_private_hosts:
        return
    address = private_address(url)
    if address is not None:
        raise InvalidInput(
            "webhook-host-not-allowed",
            "the webhook URL's host resolves to a private, loopback or link-local address",
            field="url",
        )


def _checked_secret(secret: str) -> str:
    size = None
    if _SECRET_PATTERN.match(secret):
        try:
            raw = secret[len(SECRET_PREFIX) :]
            size = len(base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True))
        except (binascii.Error, ValueError):
            size = None
    if size is None or not _SECRET_BYTES[0] <= size <= _SECRET_BYTES[1]:
        raise InvalidInput(
            "invalid-secret",
            f"the secret must be {SECRET_PREFIX}<base64 of {_SECRET_BYTES[0]} to {_SECRET_BYTES[1]} bytes>",
            field="secret",
        )
    return secret


@dataclass(frozen=True)
class CreatedEndpoint:
    endpoint: WebhookEndpoint
    generated_secret: str | None  # answered once, when Lethe made it


def create_endpoint(
    session: Session, settings: Settings, caller: Principal, body: EndpointCreate
) -> CreatedEndpoint:
    url = _checked_url(body.url)
    _checked_host(settings, url)
    generated = new_secret() if body.secret is None else None
    secret = generated or _checked_secret(str(body.secret))
    if repository.get_endpoint(session, caller.tenant, body.name) is not None:
        raise Conflict(
            "webhook-endpoint-name-taken", f"a webhook endpoint named {body.name!r} exists", name=body.name
        )
    endpoint = WebhookEndpoint(
        tenant=caller.tenant, name=body.name, url=url, events=sorted(set(body.events)), secret=secret,
        description=body.description, created_by=caller.actor,
    )  # fmt: skip
    repository.add(session, endpoint)
    return CreatedEndpoint(endpoint, generated)


def get_endpoint(session: Session, tenant: str, name: str) -> WebhookEndpoint:
    """The tenant's endpoint (another tenant's is as unknown as a missing one)."""
    endpoint = repository.get_endpoint(session, tenant, name)
    if endpoint is None:
        raise NotFound("webhook-endpoint-not-found", f"no webhook endpoint named {name!r}", name=name)
    return endpoint


def list_endpoints(session: Session, tenant: str, cursor: str | None, limit: int) -> Page[WebhookEndpoint]:
    after = decode_name_key(cursor) if cursor else None
    rows = repository.list_endpoints(session, tenant, after, limit + 1)
    return page_from_rows(rows, limit, key_of=lambda endpoint: (endpoint.name,), encode=encode_name_cursor)


def delete_endpoint(session: Session, tenant: str, name: str) -> None:
    """The endpoint receives nothing more once committed; its deliveries and their attempts go with it."""
    repository.delete_endpoint(session, get_endpoint(session, tenant, name))


@dataclass(frozen=True)
class DeliveryView:
    delivery: WebhookDelivery
    event: WebhookEvent
    attempts: list[WebhookAttempt]


def list_deliveries(
    session: Session, tenant: str, name: str, *, state: str | None, cursor: str | None, limit: int
) -> Page[DeliveryView]:
    """The endpoint's deliveries newest first, with their attempts; filter by state."""
    endpoint = get_endpoint(session, tenant, name)
    if state is not None and state not in DELIVERY_STATES:
        raise InvalidInput(
            "unknown-state", f"no delivery state {state!r}", field="state", states=list(DELIVERY_STATES)
        )
    before = decode_time_key(cursor) if cursor else None
    rows = repository.list_deliveries(session, endpoint.id, state=state, before=before, limit=limit + 1)
    page = page_from_rows(rows, limit, key_of=lambda d: (d.created_at, d.id), encode=encode_time_cursor)
    events = repository.events_by_id(session, [d.event_id for d in page.items])
    attempts = repository.attempts_of(session, [d.id for d in page.items])
    views = [DeliveryView(d, events[d.event_id], attempts.get(d.id, [])) for d in page.items]
    return Page(items=views, next_cursor=page.next_cursor)


def retry_until(settings: Settings, delivery: WebhookDelivery) -> datetime:
    """The end of the delivery's retry window: an attempt that fails after it fails the delivery."""
    return delivery.created_at + timedelta(seconds=settings.webhook_retry_window_s)


# Events: written into the outbox in the caller's transaction -----------------------------------------------


def _event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def _add_event(
    session: Session,
    event_type: str,
    tenant: str,
    request_id: str,
    data: dict[str, Any],
    when: datetime,
    endpoints: Sequence[WebhookEndpoint],
) -> WebhookEvent:
    event_id = _event_id()
    payload = {"id": event_id, "type": event_type, "timestamp": when.isoformat(), "data": data}
    event = WebhookEvent(
        id=event_id, tenant=tenant, type=event_type, request_id=request_id, payload=payload, created_at=when
    )
    repository.add(session, event)
    _add_deliveries(session, event, endpoints, when)
    return event


def _add_deliveries(
    session: Session, event: WebhookEvent, endpoints: Sequence[WebhookEndpoint], when: datetime
) -> int:
    rows = [
        WebhookDelivery(event_id=event.id, endpoint_id=endpoint.id, state="pending", attempt_count=0,
                        next_attempt_at=when, created_at=when)
        for endpoint in endpoints
    ]  # fmt: skip
    repository.add(session, *rows)
    return len(rows)


def _erasures_summary(session: Session, request_id: str) -> list[dict[str, Any]]:
    summary = []
    for target in erasures_repository.targets_of_request(session, request_id):
        model = models_repository.get_model(session, target.model_id)
        version = (
            models_repository.get_version(session, target.result_version_id)
            if target.result_version_id
            else None
        )
        summary.append({
            "model": model.name if model else None, "model_id": target.model_id, "state": target.state,
            "verdict": target.verdict, "result_version": version.number if version else None,
            "settled_at": target.settled_at.isoformat() if target.settled_at else None,
        })  # fmt: skip
    return summary


def request_settled(session: Session, request: DeletionRequest, when: datetime) -> WebhookEvent | None:
    """The ``deletion_request.settled`` event of a request that settled in this transaction, with one
    delivery per endpoint of its tenant subscribed to it (none: no event)."""
    return requests_settled(session, [request], when)[0]


def requests_settled(
    session: Session, requests: Sequence[DeletionRequest], when: datetime
) -> list[WebhookEvent | None]:
    """:func:`request_settled` of each of many requests; each tenant's endpoints read once."""
    endpoints: dict[str, Sequence[WebhookEndpoint]] = {}
    events: list[WebhookEvent | None] = []
    for request in requests:
        dataset = datasets_repository.get_dataset(session, request.dataset_id)
        assert dataset is not None  # a foreign key
        if dataset.tenant not in endpoints:
            endpoints[dataset.tenant] = repository.subscribed_endpoints(session, SETTLED, dataset.tenant)
        events.append(_settled_event(session, request, when, dataset.tenant, endpoints[dataset.tenant]))
    return events


def _settled_event(
    session: Session,
    request: DeletionRequest,
    when: datetime,
    tenant: str,
    endpoints: Sequence[WebhookEndpoint],
) -> WebhookEvent | None:
    if not endpoints:
        return None
    data = {
        "request_id": request.id, "state": request.state, "dataset_id": request.dataset_id,
        "model_id": request.model_id, "sample_count": request.sample_count,
        "received_at": request.received_at.isoformat(), "due_at": request.due_at.isoformat(),
        "completed_at": when.isoformat(), "due_date_met": when <= request.due_at,
        "erasures": _erasures_summary(session, request.id),
        "report_url": f"/deletion-requests/{request.id}/report",
    }  # fmt: skip
    return _add_event(session, SETTLED, tenant, request.id, data, when, endpoints)


def expire_events(session: Session, settings: Settings, now: datetime) -> int:
    """Delete events (with their deliveries and attempts) older than the delivery window: by then every
    delivery has succeeded or failed, and the event is no record Lethe needs to keep."""
    cutoff = now - timedelta(seconds=settings.webhook_retry_window_s)
    return repository.delete_events_before(session, cutoff)


def _due_soon_data(request: DeletionRequest, now: datetime) -> dict[str, Any]:
    days_left = math.floor((request.due_at - now).total_seconds() / 86400)
    return {
        "request_id": request.id, "state": request.state, "dataset_id": request.dataset_id,
        "model_id": request.model_id,
        "received_at": request.received_at.isoformat(), "due_at": request.due_at.isoformat(),
        "days_left": days_left, "overdue": request.due_at <= now,
        "request_url": f"/deletion-requests/{request.id}",
    }  # fmt: skip


def enqueue_due_soon(session: Session, settings: Settings, now: datetime) -> int:
    """``deletion_request.due_soon`` for every request still processing within ``webhook_due_soon_days`` of
    its due date: one event per request, one delivery per subscribed endpoint of its tenant (an endpoint
    registered later gets one too, while the request is open). Returns the deliveries added."""
    if settings.webhook_due_soon_days == 0:
        return 0
    by_tenant: dict[str, list[WebhookEndpoint]] = defaultdict(list)
    for endpoint in repository.subscribed_endpoints(session, DUE_SOON):
        by_tenant[endpoint.tenant].append(endpoint)
    if not by_tenant:
        return 0
    horizon = now + timedelta(days=settings.webhook_due_soon_days)
    added = 0
    offset = 0
    while True:
        rows = repository.open_requests_due_by(
            session, sorted(by_tenant), horizon, limit=_DUE_SOON_PAGE, offset=offset
        )
        for request, tenant in rows:
            endpoints = by_tenant[tenant]
            event = repository.event_of_request(session, request.id, DUE_SOON)
            if event is None:
                data = _due_soon_data(request, now)
                _add_event(session, DUE_SOON, tenant, request.id, data, now, endpoints)
                added += len(endpoints)
                continue
            served = repository.endpoint_ids_with_delivery(session, event.id)
            added += _add_deliveries(session, event, [e for e in endpoints if e.id not in served], now)
        if len(rows) < _DUE_SOON_PAGE:
            return added
        offset += _DUE_SOON_PAGE


# Delivery --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One attempt a worker took: everything it needs to send it, outside any transaction."""

    delivery_id: str
    number: int  # the attempt's number: its record must find the delivery still at it
    endpoint_id: str
    url: str
    secret: str
    webhook_id: str
    body: str


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def body_of(payload: dict[str, Any]) -> str:
    """The bytes every attempt of an event sends (and signs): its payload as compact, sorted JSON."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=True)


def signed_headers(secret: str, webhook_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """Standard Webhooks headers: ``webhook-signature`` is ``v1,`` + base64 HMAC-SHA256 (key: the secret's
    bytes) of ``{webhook-id}.{webhook-timestamp}.{body}``."""
    signature = Webhook(secret).sign(webhook_id, timestamp, body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(math.floor(timestamp.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def lease(settings: Settings) -> timedelta:
    """How long a claimed attempt keeps other workers off its delivery: past any attempt's timeouts."""
    return timedelta(seconds=4 * settings.webhook_timeout_s + 30)


def _fair(candidates: Sequence[tuple[str, str]], limit: int) -> list[str]:
    """Up to ``limit`` of the (delivery, endpoint) candidates' deliveries, one per endpoint in turn: an
    endpoint with a long backlog (or a slow one) leaves room for the others."""
    queues: dict[str, list[str]] = defaultdict(list)
    for delivery_id, endpoint_id in candidates:
        queues[endpoint_id].append(delivery_id)
    picked: list[str] = []
    while queues and len(picked) < limit:
        for endpoint_id in list(queues):
            picked.append(queues[endpoint_id].pop(0))
            if not queues[endpoint_id]:
                del queues[endpoint_id]
            if len(picked) == limit:
                break
    return picked


def claim_due(session: Session, settings: Settings, now: datetime, limit: int) -> list[Claim]:
    """Take up to ``limit`` due attempts (rows other workers are claiming are skipped): each delivery's
    attempt number is raised and its next attempt moved to the end of a lease. Commit before sending."""
    if limit <= 0:
        return []
    picked = repository.lock_due(
        session, _fair(repository.due_candidates(session, now, limit * 4), limit), now
    )
    events = repository.events_by_id(session, sorted({d.event_id for d in picked}))
    claims = []
    for delivery in picked:
        endpoint = repository.get_endpoint_by_id(session, delivery.endpoint_id)
        assert endpoint is not None  # a foreign key
        delivery.attempt_count += 1
        delivery.next_attempt_at = now + lease(settings)
        claims.append(
            Claim(delivery.id, delivery.attempt_count, endpoint.id, endpoint.url, endpoint.secret,
                  delivery.event_id, body_of(events[delivery.event_id].payload))
        )  # fmt: skip
    session.flush()
    return claims


def backoff(settings: Settings, number: int, rng: random.Random) -> timedelta:
    """The wait after failed attempt ``number``: the initial backoff doubled each time, capped, then
    jittered into its upper half (so receivers that failed together are not retried together)."""
    base = min(settings.webhook_initial_backoff_s * 2 ** min(number - 1, 62), settings.webhook_max_backoff_s)
    return timedelta(seconds=base / 2 + rng.random() * base / 2)


def record(
    session: Session,
    settings: Settings,
    claim: Claim,
    outcome: Outcome,
    now: datetime,
    rng: random.Random,
    actor: str = "webhooks",
) -> WebhookDelivery | None:
    """Record a claimed attempt and decide what follows: delivered, the next attempt after a backoff (at the
    latest at the window's end), or failed once an attempt fails at or after the window's end. None when
    the delivery no longer awaits this attempt (its endpoint was deleted, or its lease lapsed and another
    worker took it over)."""
    delivery = repository.lock_delivery(session, claim.delivery_id)
    if delivery is None or delivery.state != "pending" or delivery.attempt_count != claim.number:
        return None
    repository.add(
        session,
        WebhookAttempt(delivery_id=delivery.id, number=claim.number, started_at=outcome.started_at,
                       duration_ms=outcome.duration_ms, status_code=outcome.status_code, error=outcome.error,
                       response=outcome.response),
    )  # fmt: skip
    delivery.last_attempt_at = outcome.started_at
    delivery.last_status_code = outcome.status_code
    delivery.last_error = outcome.error
    deadline = retry_until(settings, delivery)
    if outcome.delivered:
        delivery.state, delivery.delivered_at, delivery.next_attempt_at = "delivered", now, None
    elif now >= deadline:
        delivery.state, delivery.failed_at, delivery.next_attempt_at = "failed", now, None
    else:
        delivery.next_attempt_at = min(now + backoff(settings, claim.number, rng), deadline)
    session.flush()
    if delivery.state != "pending":
        event = repository.get_event(session, delivery.event_id)
        assert event is not None  # a foreign key
        trail.append(
            session, f"webhook.{delivery.state}", actor=actor, subject_type="webhook",
            subject_id=delivery.id, request_id=event.request_id,
            data={"endpoint_id": delivery.endpoint_id, "webhook_id": event.id, "event_type": event.type,
                  "attempts": delivery.attempt_count, "status_code": delivery.last_status_code},
        )  # fmt: skip
    return delivery
