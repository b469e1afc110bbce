"""The audit trail on the real Postgres: every step of a request is an event, the chain verifies, the
database refuses edits, and an edit made behind its back (trigger disabled) is named."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.core.settings import Settings
from service.reports.keys import KeyRing
from service.trail.service import verify_chain
from tests.service.conftest import job_of


def _cancelled_request(client: TestClient, model: dict[str, Any]) -> dict[str, Any]:
    request = client.post("/deletion-requests", json={"model": model["name"], "sample_ids": ["s3"]}).json()
    assert client.post(f"/jobs/{job_of(request)}/cancel").status_code == 202
    return dict(request)


def test_a_requests_history_is_in_the_trail_and_in_its_report(
    client: TestClient, model: dict[str, Any], settings: Settings
) -> None:
    KeyRing(settings.report_key_dir).generate()
    request = _cancelled_request(client, model)
    report = client.get(f"/deletion-requests/{request['id']}/report").json()
    client.get(f"/deletion-requests/{request['id']}/report.sig")
    events = client.get(f"/deletion-requests/{request['id']}/trail").json()["items"]
    assert [e["kind"] for e in events] == [
        "request.created", "erasure.queued", "erasure.canceled", "request.settled", "report.generated",
        "report.signed", "report.downloaded", "report.downloaded",
    ]  # fmt: skip
    # A job may hold many requests: the request's erasure events name it.
    assert events[2]["data"]["job_id"] == job_of(request)
    assert [e["data"].get("form") for e in events[-2:]] == ["json", "signature"]
    # Events of other subjects (the job's own) lie between them in the one chain.
    assert all(later["seq"] > earlier["seq"] for earlier, later in itertools.pairwise(events))
    # The report carries its request's chain segment up to its settling.
    segment = report["trail"]
    assert segment["first_hash"] == events[0]["hash"] and segment["last_hash"] == events[3]["hash"]
    check = client.get("/audit-trail/verification").json()
    assert check["valid"] and check["first_broken_seq"] is None and check["events"] >= len(events)


def test_the_database_refuses_to_edit_or_delete_an_event(
    client: TestClient, model: dict[str, Any], session: Session
) -> None:
    _cancelled_request(client, model)
    for statement in ("UPDATE trail_events SET actor = 'someone else'", "DELETE FROM trail_events"):
        with pytest.raises(DBAPIError, match="append-only"), session.begin_nested():
            session.execute(text(statement))
    assert verify_chain(session).valid


def test_an_edit_behind_the_triggers_back_is_named(
    client: TestClient, model: dict[str, Any], session: Session
) -> None:
    _cancelled_request(client, model)
    _cancelled_request(client, model)
    seqs = session.scalars(text("SELECT seq FROM trail_events ORDER BY seq")).all()
    target = seqs[len(seqs) // 2]
    session.execute(text("ALTER TABLE trail_events DISABLE TRIGGER trail_events_append_only"))
    session.execute(
        text('UPDATE trail_events SET data = \'{"state": "completed"}\' WHERE seq = :s'), {"s": target}
    )
    check = client.get("/audit-trail/verification").json()
    assert not check["valid"] and check["first_broken_seq"] == target and "edited" in check["reason"]
    session.execute(text("DELETE FROM trail_events WHERE seq > :s"), {"s": target - 1})
    session.execute(text("ALTER TABLE trail_events ENABLE TRIGGER trail_events_append_only"))
    tail = verify_chain(session)  # the edited row and everything after it are gone: the head names them
    assert not tail.valid and tail.first_broken_seq == target and "missing" in (tail.reason or "")
