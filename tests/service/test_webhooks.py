"""Webhooks: endpoints of a tenant, events written in the transaction that settles a request (none for a
rolled-back one), the due-soon check, and delivery as the workers run it (``worker.webhooks.deliver_due``,
driven here with an injected clock) to real HTTP receivers on loopback ports: retried with backoff under one
webhook-id until accepted, signed as Standard Webhooks specifies, failed once at the end of the window for a
receiver that never answers (which delays no other), and never to another tenant."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import httpx
import hypothesis
import pytest
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from service.app import create_app
from service.core.database import make_engine, make_session_factory
from service.core.settings import Settings
from service.jobs import service as jobs_service
from service.webhooks import repository
from service.webhooks import service as webhooks_service
from service.webhooks.schemas import WEBHOOK_URL_PATTERN
from service.webhooks.tables import WebhookDelivery, WebhookEndpoint, WebhookEvent
from tests.audit.memorised import RECIPE
from tests.service.conftest import RecordingDispatcher, count_rows, issue_token, job_of
from tests.service.memorised_service import memorised_service
from tests.service.test_datasets import assert_problem
from worker.webhooks import check_due_soon, deliver_due, send

TIMEOUT_S = 0.5  # a receiver that never answers costs this much per attempt
WINDOW_S = 20.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest's, with a short retry window, backoff and timeout (the API shows the same window)."""
    return settings.model_copy(
        update={"webhook_timeout_s": TIMEOUT_S, "webhook_initial_backoff_s": 1.0,
                "webhook_max_backoff_s": 4.0, "webhook_retry_window_s": WINDOW_S, "webhook_concurrency": 4}
    )  # fmt: skip


@dataclass
class Received:
    at: float  # time.monotonic()
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A webhook receiver on a loopback port: answers 500 to its first ``failures`` deliveries, then 200;
    ``hang``: never answers (until the test ends)."""

    failures: int = 0
    hang: bool = False
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def accepted(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]


@pytest.fixture
def receivers() -> Iterator[Any]:
    servers: list[tuple[ThreadingHTTPServer, Receiver]] = []

    def start(**behaviour: Any) -> Receiver:
        receiver = Receiver(**behaviour)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                arrived = time.monotonic()
                if receiver.hang:
                    receiver.received.append(Received(arrived, dict(self.headers), body, 0))
                    receiver.release.wait(30)
                    return
                status = 500 if len(receiver.received) < receiver.failures else 200
                receiver.received.append(Received(arrived, dict(self.headers), body, status))
                answer = b'{"ok": true}' if status == 200 else b"temporarily broken"
                self.send_response(status)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/lethe"
        servers.append((server, receiver))
        return receiver

    yield start
    for server, receiver in servers:
        receiver.release.set()
        server.shutdown()
        server.server_close()


class Hooks(NamedTuple):
    """What most tests here work with, unpacked at their start."""

    client: TestClient
    session_factory: sessionmaker[Session]
    settings: Settings
    model: dict[str, Any]
    receivers: Any  # receivers(failures=0, hang=False) -> Receiver


@pytest.fixture
def hooks(
    client: TestClient,
    session_factory: sessionmaker[Session],
    settings: Settings,
    model: dict[str, Any],
    receivers: Any,
) -> Hooks:
    return Hooks(client, session_factory, settings, model, receivers)


def register(client: TestClient, name: str, url: str, **extra: Any) -> dict[str, Any]:
    answer = client.post("/webhook-endpoints", json={"name": name, "url": url, **extra})
    assert answer.status_code == 201, answer.text
    assert answer.headers["location"] == f"/webhook-endpoints/{name}"
    return dict(answer.json())


def settle_by_cancel(client: TestClient, scope: dict[str, Any]) -> dict[str, Any]:
    """A deletion request, settled (canceled) at once by canceling its queued job."""
    request = client.post("/deletion-requests", json={**scope, "subject_id": "alice"}).json()
    assert client.post(f"/jobs/{job_of(request)}/cancel").status_code == 202
    settled = client.get(f"/deletion-requests/{request['id']}").json()
    assert settled["state"] == "canceled"
    return dict(settled)


def deliveries(client: TestClient, name: str, **params: Any) -> list[dict[str, Any]]:
    answer = client.get(f"/webhook-endpoints/{name}/deliveries", params=params)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


def hmac_signature(secret: str, headers: dict[str, str], body: bytes) -> str:
    """The receiving side's own check, without the library: base64 HMAC-SHA256 of id.timestamp.body."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def test_a_receiver_failing_twice_gets_the_settled_event_once_signed_under_one_id(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    receiver = receivers(failures=2)
    endpoint = register(client, "crm", receiver.url, events=["deletion_request.settled"])
    secret = endpoint["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert client.get("/webhook-endpoints/crm").json()["secret"] is None  # shown once
    request = settle_by_cancel(client, {"model": model["name"]})
    [pending] = deliveries(client, "crm")
    assert pending["state"] == "pending" and pending["attempt_count"] == 0 and pending["attempts"] == []

    now = datetime.now(UTC)
    for _ in range(3):
        [attempted] = deliver_due(session_factory, settings, now=now)
        [delivery] = deliveries(client, "crm")
        if delivery["state"] != "pending":
            break
        next_at = datetime.fromisoformat(delivery["next_attempt_at"])
        # Exponential backoff with jitter: within (base/2, base] of the attempt, base = 1 s, then 2 s.
        base = settings.webhook_initial_backoff_s * 2 ** (delivery["attempt_count"] - 1)
        assert base / 2 <= (next_at - now).total_seconds() <= base
        assert deliver_due(session_factory, settings, now=now) == []  # not due before its time
        now = next_at
    assert attempted.state == "delivered"

    # Exactly once accepted, three attempts, one webhook-id, a valid signature each time.
    assert [r.status for r in receiver.received] == [500, 500, 200] and len(receiver.accepted()) == 1
    ids = {r.headers["webhook-id"] for r in receiver.received}
    assert ids == {delivery["webhook_id"]} and delivery["webhook_id"].startswith("evt_")
    assert len({r.body for r in receiver.received}) == 1  # the same body on every retry
    accepted = receiver.accepted()[0]
    payload = Webhook(secret).verify(accepted.body, accepted.headers)  # raises unless genuine and fresh
    assert accepted.headers["webhook-signature"] == hmac_signature(secret, accepted.headers, accepted.body)
    forged = {**accepted.headers, "webhook-id": "evt_other"}
    assert hmac_signature(secret, forged, accepted.body) != accepted.headers["webhook-signature"]
    assert payload["type"] == "deletion_request.settled" and payload["id"] == delivery["webhook_id"]
    data = payload["data"]
    assert data["request_id"] == request["id"] and data["state"] == "canceled"
    assert datetime.fromisoformat(data["completed_at"]) == datetime.fromisoformat(request["completed_at"])
    assert data["report_url"] == f"/deletion-requests/{request['id']}/report"
    assert [(e["model"], e["state"]) for e in data["erasures"]] == [(model["name"], "canceled")]

    # The attempts as the API lists them; nothing more is sent.
    assert delivery["state"] == "delivered" and delivery["attempt_count"] == 3
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert [a["number"] for a in delivery["attempts"]] == [1, 2, 3]
    assert delivery["attempts"][0]["error"] == "answered HTTP 500"
    assert delivery["attempts"][0]["response"] == "temporarily broken"
    assert delivery["delivered_at"] and delivery["next_attempt_at"] is None and delivery["last_error"] is None
    assert delivery["payload"] == payload
    assert deliver_due(session_factory, settings, now=now + timedelta(hours=1)) == []
    assert len(receiver.received) == 3
    trail = client.get(f"/deletion-requests/{request['id']}/trail").json()["items"]
    [notified] = [e for e in trail if e["kind"] == "webhook.delivered"]
    assert notified["data"]["webhook_id"] == delivery["webhook_id"] and notified["data"]["attempts"] == 3


def test_a_receiver_that_never_answers_fails_once_and_delays_no_other(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    down, healthy = receivers(hang=True), receivers()
    register(client, "down", down.url)
    register(client, "healthy", healthy.url)
    request = settle_by_cancel(client, {"model": model["name"]})

    now = datetime.now(UTC)
    started = time.monotonic()
    first = deliver_due(session_factory, settings, now=now)
    assert sorted(a.state or "" for a in first) == ["delivered", "pending"]
    # Sent side by side: the healthy receiver had its event at once, not after the other's timeout.
    [arrived] = healthy.received
    assert arrived.at - started < TIMEOUT_S and time.monotonic() - started < 2 * TIMEOUT_S + 1
    [delivered] = deliveries(client, "healthy")
    assert delivered["state"] == "delivered" and delivered["attempt_count"] == 1

    rounds = 1
    while (delivery := deliveries(client, "down")[0])["state"] == "pending":
        assert delivery["last_error"].startswith("no answer within 0.5 s")
        now = datetime.fromisoformat(delivery["next_attempt_at"])
        assert now <= datetime.fromisoformat(delivery["retry_until"])  # the last one at the window's end
        assert len(deliver_due(session_factory, settings, now=now)) == 1  # only the failing one is retried
        rounds += 1
        assert rounds < 20
    [failed] = deliveries(client, "down")  # exactly one delivery, failed, with every attempt listed
    assert failed["state"] == "failed" and failed["failed_at"] and failed["next_attempt_at"] is None
    assert failed["attempt_count"] == rounds == len(failed["attempts"]) == len(down.received) >= 4
    assert all(a["status_code"] is None and "no answer" in a["error"] for a in failed["attempts"])
    assert all(a["duration_ms"] < 3000 for a in failed["attempts"])  # bounded by the timeout
    last = datetime.fromisoformat(failed["attempts"][-1]["started_at"])
    assert last == datetime.fromisoformat(failed["retry_until"])
    assert deliveries(client, "down", state="failed") == [failed]
    assert deliveries(client, "down", state="delivered") == []
    assert len({r.headers["webhook-id"] for r in down.received}) == 1
    assert len(healthy.received) == 1  # nothing sent twice to the healthy one
    assert deliver_due(session_factory, settings, now=now + timedelta(days=2)) == []
    kinds = [e["kind"] for e in client.get(f"/deletion-requests/{request['id']}/trail").json()["items"]]
    assert kinds.count("webhook.delivered") == 1 and kinds.count("webhook.failed") == 1


def test_due_soon_fires_once_per_request_and_endpoint_while_the_request_is_open(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    dpo, settled_only = receivers(), receivers()
    register(client, "dpo", dpo.url, events=["deletion_request.due_soon"])
    register(client, "settled-only", settled_only.url, events=["deletion_request.settled"])
    soon = datetime.now(UTC) + timedelta(days=3, hours=1)
    urgent = client.post(
        "/deletion-requests", json={"model": model["name"], "subject_id": "alice", "due_at": soon.isoformat()}
    ).json()
    later = client.post("/deletion-requests", json={"model": model["name"], "sample_ids": ["s3"]}).json()
    assert urgent["state"] == later["state"] == "processing"  # later: due in 30 days, not soon

    now = datetime.now(UTC)
    assert check_due_soon(session_factory, settings, now=now) == 1
    assert check_due_soon(session_factory, settings, now=now) == 0  # once
    assert check_due_soon(session_factory, settings, now=now + timedelta(days=1)) == 0
    [attempted] = deliver_due(session_factory, settings, now=now + timedelta(days=1))
    assert attempted.state == "delivered"
    [event] = dpo.received
    payload = json.loads(event.body)
    assert payload["type"] == "deletion_request.due_soon"
    assert payload["data"]["request_id"] == urgent["id"] and payload["data"]["days_left"] == 3
    assert payload["data"]["due_at"] == datetime.fromisoformat(urgent["due_at"]).isoformat()
    assert payload["data"]["overdue"] is False and settled_only.received == []
    [delivery] = deliveries(client, "dpo")
    assert delivery["event_type"] == "deletion_request.due_soon" and delivery["request_id"] == urgent["id"]

    # An endpoint registered later gets the same event (same webhook-id) once too.
    late = receivers()
    register(client, "late", late.url, events=["deletion_request.due_soon"])
    assert check_due_soon(session_factory, settings, now=now) == 1
    assert check_due_soon(session_factory, settings, now=now) == 0
    deliver_due(session_factory, settings, now=now)
    assert [r.headers["webhook-id"] for r in late.received] == [event.headers["webhook-id"]]
    # Off: nothing is checked.
    off = settings.model_copy(update={"webhook_due_soon_days": 0})
    register(client, "later-still", late.url, events=["deletion_request.due_soon"])
    assert check_due_soon(session_factory, off, now=now) == 0

    # A settled request is not due anything, and a request within the horizon only then counts.
    assert client.post(f"/jobs/{job_of(urgent)}/cancel").status_code == 202
    register(client, "after-settling", late.url, events=["deletion_request.due_soon"])
    assert check_due_soon(session_factory, settings, now=now) == 0


def test_an_overdue_open_request_is_due_soon_with_negative_days(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    receiver = receivers()
    register(client, "dpo", receiver.url, events=["deletion_request.due_soon"])
    past = datetime.now(UTC) - timedelta(days=1, hours=12)
    request = client.post(
        "/deletion-requests", json={"model": model["name"], "subject_id": "alice", "due_at": past.isoformat()}
    ).json()
    assert request["state"] == "processing"
    assert check_due_soon(session_factory, settings, now=datetime.now(UTC)) == 1
    deliver_due(session_factory, settings)  # the real clock
    data = json.loads(receiver.received[0].body)["data"]
    assert data["overdue"] is True and data["days_left"] == -2


def test_endpoints_and_events_are_the_tenants_own(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    mine, theirs = receivers(), receivers()
    register(client, "acme-hook", mine.url)
    other = TestClient(client.app, raise_server_exceptions=False)
    other.headers["Authorization"] = f"Bearer {issue_token(session_factory, tenant='other')}"
    register(other, "other-hook", theirs.url)
    register(other, "acme-hook", theirs.url)  # names are unique within a tenant only

    for method, path in (
        ("GET", "/webhook-endpoints/other-hook"),
        ("DELETE", "/webhook-endpoints/other-hook"),
        ("GET", "/webhook-endpoints/other-hook/deliveries"),
    ):
        intruding = client.request(method, path)
        nowhere = client.request(method, path.replace("other-hook", "nowhere"))
        assert_problem(intruding, 404, "webhook-endpoint-not-found")
        assert intruding.json()["type"] == nowhere.json()["type"] and nowhere.status_code == 404
    assert [e["name"] for e in client.get("/webhook-endpoints").json()["items"]] == ["acme-hook"]
    assert [e["name"] for e in other.get("/webhook-endpoints").json()["items"]] == ["acme-hook", "other-hook"]
    assert client.get("/webhook-endpoints/acme-hook").json()["url"] == mine.url
    assert other.get("/webhook-endpoints/acme-hook").json()["url"] == theirs.url

    settle_by_cancel(client, {"model": model["name"]})
    attempted = deliver_due(session_factory, settings, now=datetime.now(UTC))
    assert [a.state for a in attempted] == ["delivered"]
    assert len(mine.received) == 1 and theirs.received == []
    assert deliveries(other, "acme-hook") == deliveries(other, "other-hook") == []
    assert other.get("/webhook-endpoints/other-hook").status_code == 200  # acme's DELETE did nothing


def test_registration_is_validated_and_deletion_stops_deliveries(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    for url in ("ftp://example.org/x", "not a url", "http://", "http://user:pw@example.org/", "javascript:1",
                "http://example.org:99999/", "https://example.org/#frag"):  # fmt: skip
        answer = client.post("/webhook-endpoints", json={"name": "x", "url": url})
        assert assert_problem(answer, 422, "invalid-url")["field"] == "url", url
    for secret in ("plain", "whsec_" + base64.b64encode(b"short").decode(), "whsec_!!!!"):
        body = {"name": "x", "url": "https://example.org", "secret": secret}
        answer = client.post("/webhook-endpoints", json=body)
        assert assert_problem(answer, 422, "invalid-secret")["field"] == "secret", secret
    for body in ({"name": "x", "url": "https://e.org", "events": ["nope"]},
                 {"name": "x", "url": "https://e.org", "events": []},
                 {"name": "a/b", "url": "https://e.org"}):  # fmt: skip
        assert_problem(client.post("/webhook-endpoints", json=body), 422, "invalid-request")

    receiver = receivers()
    own_secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    created = register(client, "mine", receiver.url, secret=own_secret, description="the CRM")
    assert created["secret"] is None and created["description"] == "the CRM"
    assert created["events"] == ["deletion_request.due_soon", "deletion_request.settled"]
    assert_problem(client.post("/webhook-endpoints", json={"name": "mine", "url": receiver.url}), 409,
                   "webhook-endpoint-name-taken")  # fmt: skip

    settle_by_cancel(client, {"model": model["name"]})
    assert len(deliveries(client, "mine")) == 1
    assert client.delete("/webhook-endpoints/mine").status_code == 204
    assert_problem(client.get("/webhook-endpoints/mine"), 404, "webhook-endpoint-not-found")
    assert_problem(client.delete("/webhook-endpoints/mine"), 404, "webhook-endpoint-not-found")
    assert deliver_due(session_factory, settings, now=datetime.now(UTC)) == []
    assert receiver.received == []
    assert_problem(client.get("/webhook-endpoints", params={"cursor": "!!"}), 422, "invalid-request")


def test_deliveries_are_signed_with_a_secret_the_client_chose(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    receiver = receivers()
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    register(client, "mine", receiver.url, secret=secret, events=["deletion_request.settled"])
    settle_by_cancel(client, {"model": model["name"]})
    deliver_due(session_factory, settings)
    [received] = receiver.received
    Webhook(secret).verify(received.body, received.headers)
    assert received.headers["content-type"] == "application/json"


def test_the_event_is_written_with_the_settlement_and_rolled_back_with_it(
    client: TestClient, session_factory: sessionmaker[Session], model: dict[str, Any], receivers: Any
) -> None:
    register(client, "hook", receivers().url)
    request = client.post("/deletion-requests", json={"model": model["name"], "subject_id": "alice"}).json()
    with session_factory() as session:
        jobs_service.request_cancel(session, job_of(request), "acme", "test")
        # In the settling transaction: the event and its delivery, before any commit.
        event = repository.event_of_request(session, request["id"], "deletion_request.settled")
        assert event is not None and count_rows(session, WebhookDelivery) == 1
        session.rollback()
    with session_factory() as session:
        assert count_rows(session, WebhookEvent) == 0 and count_rows(session, WebhookDelivery) == 0
    assert client.get(f"/deletion-requests/{request['id']}").json()["state"] == "processing"
    # Without a subscribed endpoint no event is written at all.
    assert client.delete("/webhook-endpoints/hook").status_code == 204
    assert client.post(f"/jobs/{job_of(request)}/cancel").status_code == 202
    with session_factory() as session:
        assert count_rows(session, WebhookEvent) == 0


def test_a_claimed_attempt_is_not_claimed_again_and_a_late_record_is_dropped(hooks: Hooks) -> None:
    client, session_factory, settings, model, receivers = hooks
    register(client, "hook", receivers().url)
    settle_by_cancel(client, {"model": model["name"]})
    now = datetime.now(UTC)
    with session_factory.begin() as session:
        [claim] = webhooks_service.claim_due(session, settings, now, 10)
    with session_factory.begin() as session:  # another worker, while the first one sends
        assert webhooks_service.claim_due(session, settings, now, 10) == []
    # The first worker died: once its lease lapsed, the attempt is taken over as attempt 2.
    lapsed = now + webhooks_service.lease(settings) + timedelta(seconds=1)
    with session_factory.begin() as session:
        [takeover] = webhooks_service.claim_due(session, settings, lapsed, 10)
    assert (claim.number, takeover.number) == (1, 2) and takeover.webhook_id == claim.webhook_id
    late = webhooks_service.Outcome(now, 5, 200, None, None)
    with session_factory.begin() as session:
        assert webhooks_service.record(session, settings, claim, late, lapsed, random.Random(0)) is None
        recorded = webhooks_service.record(session, settings, takeover, late, lapsed, random.Random(0))
        assert recorded is not None and recorded.state == "delivered"
    [delivery] = deliveries(client, "hook")
    assert [a["number"] for a in delivery["attempts"]] == [2] and delivery["attempt_count"] == 2


def test_skip_locked_keeps_two_workers_off_one_delivery(module_database_url: str) -> None:
    """On Postgres, with real concurrent transactions: rows one worker is claiming are skipped by another."""
    engine = make_engine(module_database_url)
    factory = make_session_factory(engine)
    settings = Settings(database_url=module_database_url)
    now = datetime.now(UTC)
    try:
        with factory.begin() as session:
            endpoints = [
                WebhookEndpoint(tenant="t", name=f"e{i}", url="http://127.0.0.1:9/", events=["x"],
                                secret=webhooks_service.new_secret(), created_by="test")
                for i in range(2)
            ]  # fmt: skip
            event = WebhookEvent(id="evt_skip_locked", tenant="t", type="deletion_request.settled",
                                 request_id=None, payload={"id": "evt_skip_locked"})  # fmt: skip
            session.add_all([*endpoints, event])
            session.flush()
            session.add_all(
                WebhookDelivery(event_id=event.id, endpoint_id=e.id, state="pending", attempt_count=0,
                                next_attempt_at=now, created_at=now)
                for e in endpoints
            )  # fmt: skip
        first, second = factory(), factory()
        with first.begin(), second.begin():
            mine = webhooks_service.claim_due(first, settings, now, 1)  # holds its row until commit
            theirs = webhooks_service.claim_due(second, settings, now, 10)
            assert len(mine) == len(theirs) == 1 and mine[0].delivery_id != theirs[0].delivery_id
        with factory.begin() as session:
            assert webhooks_service.claim_due(session, settings, now, 10) == []  # both leased
            rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.event_id == event.id)).all()
            assert sorted(d.attempt_count for d in rows) == [1, 1]
        first.close()
        second.close()
    finally:
        with factory.begin() as session:  # the module's database is shared with the next test
            session.execute(delete(WebhookDelivery))
            session.execute(delete(WebhookEvent))
            session.execute(delete(WebhookEndpoint))
        engine.dispose()


@pytest.mark.slow
def test_a_request_completed_by_a_real_job_is_announced_with_its_verdict(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str, receivers: Any
) -> None:
    """Settlement in the worker's transaction (the pipeline run in-process, as in test_erasure_pipeline)."""
    with memorised_service(
        tmp_path_factory.mktemp("webhooks"), module_database_url, audit_references=4,
        gate_max_audit_drop=100.0, gate_max_class_drop=100.0, audit_level=1e-12,
        webhook_allow_private_hosts=True,
    ) as env:  # fmt: skip
        receiver = receivers()
        secret = register(env.client, "crm", receiver.url, events=["deletion_request.settled"])["secret"]
        env.register_model("m")
        ids = [env.case.dataset.sample_ids[r] for r in env.case.remaining_rows[:5]]
        retrain = {"method": "retrain", "config": {"epochs": RECIPE.epochs, "lr": RECIPE.lr, "seed": 7}}
        request = env.client.post("/deletion-requests", json={"model": "m", "sample_ids": ids, **retrain})
        assert request.status_code == 202, request.text
        job_id = job_of(request.json())
        while env.client.get(f"/jobs/{job_id}").json()["state"] in ("queued", "running", "evaluating"):
            env.run_job(job_id)
        settled = env.client.get(f"/deletion-requests/{request.json()['id']}").json()
        assert settled["state"] == "completed", settled
        [attempted] = deliver_due(env.session_factory, env.settings)
        assert attempted.state == "delivered"
        [received] = receiver.received
        data = Webhook(secret).verify(received.body, received.headers)["data"]
        assert data["state"] == "completed" and data["request_id"] == settled["id"]
        [erasure] = settled["erasures"]
        assert data["erasures"] == [
            {"model": "m", "model_id": erasure["model_id"], "state": "completed",
             "verdict": erasure["verdict"], "result_version": erasure["result_version"],
             "settled_at": datetime.fromisoformat(erasure["settled_at"]).isoformat()}
        ]  # fmt: skip
        assert erasure["result_version"] == 2 and data["due_date_met"] is True


def test_endpoints_on_private_addresses_are_refused_unless_allowed(
    settings: Settings, session_factory: sessionmaker[Session], client: TestClient
) -> None:
    """SSRF: a client must not make the workers POST into the service's own network."""
    guarded = settings.model_copy(update={"webhook_allow_private_hosts": False})
    with TestClient(create_app(guarded, RecordingDispatcher(), session_factory=session_factory)) as api:
        api.headers["Authorization"] = client.headers["Authorization"]
        for url in ("http://127.0.0.1:9000/hook", "http://localhost/hook", "http://10.1.2.3/hook",
                    "http://169.254.169.254/latest/meta-data", "http://[::1]/hook"):  # fmt: skip
            answer = api.post(
                "/webhook-endpoints",
                json={"name": "internal", "url": url, "events": ["deletion_request.settled"]},
            )
            assert_problem(answer, 422, "webhook-host-not-allowed")
        public = api.post(
            "/webhook-endpoints",
            json={
                "name": "public",
                "url": "https://93.184.215.14/hook",
                "events": ["deletion_request.settled"],
            },
        )
        assert public.status_code == 201, public.text
    # Checked again at each send (a name may resolve elsewhere later): nothing leaves for a private address.
    claim = webhooks_service.Claim("d", 1, "e", "http://127.0.0.1:9/hook", webhooks_service.new_secret(),
                                   "evt_x", "{}")  # fmt: skip
    with httpx.Client() as http:
        outcome = send(http, guarded, claim)
    assert outcome.status_code is None and "not a public address" in str(outcome.error)


@hypothesis.settings(max_examples=500, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.from_regex(WEBHOOK_URL_PATTERN, fullmatch=True))
def test_every_url_of_the_documented_form_passes_the_services_url_check(url: str) -> None:
    """The OpenAPI document states the webhook URL's form; whatever matches it, the service's own check
    (the URL parsers included) takes: a client that follows the document is not refused for its URL."""
    assert webhooks_service._checked_url(url) == url


def test_a_url_outside_the_documented_form_is_refused_saying_why() -> None:
    with pytest.raises(webhooks_service.InvalidInput, match="punycode"):
        webhooks_service._checked_url("https://bücher.example/hook")
    assert (
        webhooks_service._checked_url("https://xn--bcher-kva.example/hook")
        == "https://xn--bcher-kva.example/hook"
    )
