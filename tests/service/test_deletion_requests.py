from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.core.clock import utcnow
from service.core.settings import Settings
from service.datasets import repository as datasets_repository
from service.deletion_requests import repository as requests_repository
from service.deletion_requests.tables import DeletionRequest, DeletionRequestSample
from service.erasures import repository as erasures_repository
from service.erasures.tables import ErasureTarget
from service.idempotency.tables import IdempotencyRecord
from service.jobs.tables import Job
from tests.service.conftest import (
    RecordingDispatcher,
    count_rows,
    dataset_body,
    job_of,
    register_model,
    write_array,
)
from tests.service.test_datasets import assert_problem
from worker.engine.config import DEFAULT_METHOD, config_to_dict, make_config

TABLES = (DeletionRequest, DeletionRequestSample, ErasureTarget, Job, IdempotencyRecord)


def row_counts(session: Session) -> list[int]:
    return [count_rows(session, table) for table in TABLES]


def test_a_request_is_accepted_with_its_job_queued_and_dispatched(
    client: TestClient, model: dict[str, Any], dispatcher: RecordingDispatcher
) -> None:
    response = client.post(
        "/deletion-requests",
        json={"model": "toy-model", "sample_ids": ["s3", "s4"], "reason": "GDPR Art. 17"},
    )
    assert response.status_code == 202, response.text
    request = response.json()
    assert response.headers["location"] == f"/deletion-requests/{request['id']}"
    assert int(response.headers["retry-after"]) > 0
    job_id = job_of(request)
    assert dispatcher.dispatched == [job_id]
    assert request["state"] == "processing" and request["sample_count"] == 2
    assert request["scope"] == "model" and request["model"] == "toy-model"
    [erasure] = request["erasures"]
    assert (erasure["state"], erasure["pending_count"], erasure["already_erased_count"]) == ("pending", 2, 0)
    # The full effective configuration is recorded, not just the overrides.
    assert request["method"] == DEFAULT_METHOD and request["config"] == config_to_dict(
        make_config(DEFAULT_METHOD)
    )
    received = datetime.fromisoformat(request["received_at"])
    assert datetime.fromisoformat(request["due_at"]) - received == timedelta(days=30)
    assert client.get(response.headers["location"]).json() == request
    job = client.get(f"/jobs/{job_id}").json()
    assert job["state"] == "queued" and job["request_ids"] == [request["id"]] and not job["done"]
    assert job["batch_open"] and job["sample_count"] == 2 and job["due_at"] == request["due_at"]


@pytest.mark.parametrize(
    ("body", "slug", "offenders"),
    [
        ({"sample_ids": ["s1", "nope", "gone"]}, "unknown-samples", ["nope", "gone"]),
        ({"sample_ids": ["s1", "o0"]}, "foreign-samples", ["o0"]),
        ({"sample_ids": ["s1", "s8"]}, "audit-samples", ["s8"]),
        ({"sample_ids": ["s1", "s2", "s1"]}, "duplicate-sample-ids", ["s1"]),
        ({"sample_ids": []}, "invalid-request", None),
        ({"sample_ids": ["s1", "s2", "s3", "s4"]}, "too-many-samples", None),
        ({"subject_id": "bob"}, "unknown-subject", None),
        ({"sample_ids": ["s1"], "subject_id": "alice"}, "samples-or-subject", None),
        ({}, "samples-or-subject", None),
        ({"model": "nope", "sample_ids": ["s1"]}, "unknown-model", None),
        ({"model": None, "sample_ids": ["s1"]}, "model-or-dataset", None),
        ({"dataset_id": "nope", "sample_ids": ["s1"]}, "model-or-dataset", None),
        ({"model": None, "dataset_id": "nope", "sample_ids": ["s1"]}, "unknown-dataset", None),
        ({"sample_ids": ["s1"], "due_at": "2999-01-01T00:00:00Z"}, "invalid-due-date", None),
        ({"sample_ids": ["s1"], "due_at": "2026-01-01T00:00:00"}, "invalid-due-date", None),
        ({"sample_ids": ["s1"], "method": "magic"}, "invalid-method-config", None),
        ({"sample_ids": ["s1"], "config": {"learning_rate": 1}}, "invalid-method-config", None),
        ({"sample_ids": ["s1"], "config": {"epochs": 0}}, "invalid-method-config", None),
        ({"sample_ids": ["s1"], "config": {"seed": "7"}}, "invalid-method-config", None),
        ({"sample_ids": ["s1"], "config": {"batchnorm": "frozen"}}, "invalid-method-config", None),
        # The label-aware method under the agnostic name: a method's defining field is not a setting.
        (
            {"sample_ids": ["s1"], "method": "mixunlearn-agnostic", "config": {"label_agnostic": False}},
            "invalid-method-config",
            None,
        ),
        ({"sample_ids": ["s1\x00"]}, "invalid-request", None),
        ({"sample_ids": ["s1"], "reason": "GDPR\x00"}, "invalid-request", None),
        ({"sample_ids": ["s1"], "sampleIds": ["s1"]}, "invalid-request", None),
        ({"sample_ids": "s1"}, "invalid-request", None),
    ],
)
def test_invalid_requests_are_refused_before_anything_is_written(
    client: TestClient,
    session: Session,
    model: dict[str, Any],
    other_model: dict[str, Any],
    dispatcher: RecordingDispatcher,
    settings: Settings,
    body: dict[str, Any],
    slug: str,
    offenders: list[str] | None,
) -> None:
    settings.max_samples_per_request = 3
    before = row_counts(session)
    response = client.post(
        "/deletion-requests", json={"model": "toy-model", **body}, headers={"Idempotency-Key": f"k-{slug}"}
    )
    # Names of things that do not exist are 404, as their own paths would answer.
    problem = assert_problem(response, 404 if slug.startswith("unknown-") else 422, slug)
    if offenders is not None:
        assert problem["sample_ids"] == offenders and problem["count"] == len(offenders)
    assert row_counts(session) == before and dispatcher.dispatched == []


@pytest.fixture
def other_model(client: TestClient, tmp_path: Path) -> dict[str, Any]:
    """A second dataset whose ids (o0..o9) are not the first model's."""
    body = dataset_body(write_array(tmp_path / "other.npz", 10), name="other")
    for sample in body["samples"]:
        sample["sample_id"] = "o" + sample["sample_id"][1:]
    other = client.post("/datasets", json=body).json()
    return register_model(client, tmp_path, other["id"], name="other-model")


def test_label_aware_methods_need_a_labelled_dataset(
    client: TestClient, tmp_path: Path, session: Session
) -> None:
    unlabelled = client.post(
        "/datasets", json=dataset_body(write_array(tmp_path / "u.npz", 10), labelled=False, name="unlabelled")
    ).json()
    register_model(client, tmp_path, unlabelled["id"], name="blind")
    before = row_counts(session)
    refused = client.post(
        "/deletion-requests", json={"model": "blind", "sample_ids": ["s1"], "method": "neggrad"}
    )
    assert (
        "mixunlearn-agnostic" in assert_problem(refused, 422, "method-needs-labels")["label_agnostic_methods"]
    )
    assert row_counts(session) == before
    accepted = client.post("/deletion-requests", json={"model": "blind", "sample_ids": ["s1"]})
    assert accepted.status_code == 202 and accepted.json()["method"] == "mixunlearn-agnostic"
    assert accepted.json()["config"]["label_agnostic"] is True


def test_a_subject_expands_to_its_train_samples(
    client: TestClient, session: Session, model: dict[str, Any]
) -> None:
    response = client.post("/deletion-requests", json={"model": "toy-model", "subject_id": "alice"})
    assert response.status_code == 202
    request = response.json()
    assert request["subject_id"] == "alice" and request["sample_count"] == 3  # s8 (audit) is not trained on
    assert requests_repository.all_sample_ids(session, request["id"]) == ["s0", "s1", "s2"]


def test_samples_the_model_already_erased(
    client: TestClient, session: Session, model: dict[str, Any], dispatcher: RecordingDispatcher
) -> None:
    first = client.post("/deletion-requests", json={"model": "toy-model", "sample_ids": ["s1", "s2"]}).json()
    erase(session, model, first["id"], ["s1", "s2"])

    again = client.post("/deletion-requests", json={"model": "toy-model", "sample_ids": ["s2", "s1"]})
    assert again.status_code == 200 and "location" not in again.headers
    request = again.json()
    assert request["state"] == "completed" and request["completed_at"]
    [erasure] = request["erasures"]
    assert erasure["job_id"] is None and erasure["verdict"] == "already_erased"
    assert erasure["already_erased_count"] == 2 and erasure["pending_count"] == 0

    partly = client.post("/deletion-requests", json={"model": "toy-model", "sample_ids": ["s1", "s3"]})
    assert partly.status_code == 202
    [erasure] = partly.json()["erasures"]
    assert (erasure["pending_count"], erasure["already_erased_count"]) == (1, 1)
    assert len(dispatcher.dispatched) == 1  # the first request's job took the third one too


def erase(session: Session, model: dict[str, Any], request_id: str, sample_ids: list[str]) -> None:
    """What a succeeded job records: the samples erased from the model since its active version."""
    pks = [s.id for s in datasets_repository.find_samples(session, model["dataset_id"], sample_ids)]
    version = model["active_version"]["id"]
    erasures_repository.add_erased(session, model["id"], pks, version, request_id, utcnow())
    session.commit()


def test_idempotency_key_replays_the_first_answer(
    client: TestClient, session: Session, model: dict[str, Any], dispatcher: RecordingDispatcher
) -> None:
    body = {"model": "toy-model", "sample_ids": ["s3"]}
    headers = {"Idempotency-Key": "req-1"}
    first = client.post("/deletion-requests", json=body, headers=headers)
    counts = row_counts(session)
    replay = client.post("/deletion-requests", json=dict(reversed(body.items())), headers=headers)
    assert replay.status_code == 202 and replay.json() == first.json()
    assert replay.headers["location"] == first.headers["location"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert row_counts(session) == counts and len(dispatcher.dispatched) == 1
    mismatch = client.post("/deletion-requests", json={**body, "sample_ids": ["s4"]}, headers=headers)
    assert_problem(mismatch, 422, "idempotency-key-reused")
    assert row_counts(session) == counts
    other_key = client.post("/deletion-requests", json=body, headers={"Idempotency-Key": "req-2"})
    assert other_key.status_code == 202 and other_key.json()["id"] != first.json()["id"]


def test_a_failed_dispatch_still_accepts_the_request(
    client: TestClient, session: Session, model: dict[str, Any], dispatcher: RecordingDispatcher
) -> None:
    def broken(job_id: str, delay_s: float = 0.0) -> None:
        raise ConnectionError("redis is down")

    dispatcher.dispatch = broken  # type: ignore[method-assign]
    response = client.post("/deletion-requests", json={"model": "toy-model", "sample_ids": ["s3"]})
    assert response.status_code == 202
    job = session.get(Job, job_of(response.json()))
    assert job is not None and job.state == "queued"  # committed before dispatch: the sweeper re-sends it


def test_unknown_request_is_a_404_problem(client: TestClient) -> None:
    assert_problem(client.get("/deletion-requests/nope"), 404, "deletion-request-not-found")


def test_a_bulk_call_answers_each_item_and_commits_only_the_accepted(
    client: TestClient, session: Session, model: dict[str, Any], dispatcher: RecordingDispatcher
) -> None:
    early = (utcnow() + timedelta(days=3)).isoformat()
    single = client.post(
        "/deletion-requests",
        json={"model": "toy-model", "sample_ids": ["s7"]},
        headers={"Idempotency-Key": "t-7"},
    ).json()
    items = [
        {"model": "toy-model", "subject_id": "alice", "idempotency_key": "t-1"},
        {"model": "toy-model", "sample_ids": ["s3"], "due_at": early, "idempotency_key": "t-2"},
        {"model": "toy-model", "subject_id": "nobody", "idempotency_key": "t-3"},
        {"model": "toy-model", "sample_ids": ["s4"], "idempotency_key": "t-2"},  # the key of item 1
        {"model": "toy-model", "sample_ids": ["s7"], "idempotency_key": "t-7"},  # a single POST's key
        {"model": "toy-model", "sample_ids": ["s5"]},
    ]
    before = row_counts(session)
    answer = client.post("/deletion-requests/bulk", json={"items": items})
    assert answer.status_code == 200, answer.text
    outcome = answer.json()
    assert (outcome["accepted"], outcome["refused"]) == (4, 2)
    statuses = [(item["index"], item["status"], item["replayed"]) for item in outcome["items"]]
    assert statuses == [(0, 202, False), (1, 202, False), (2, 404, False), (3, 422, False), (4, 202, True),
                        (5, 202, False)]  # fmt: skip
    assert outcome["items"][2]["problem"]["type"] == "/problems/unknown-subject"
    assert outcome["items"][3]["problem"]["type"] == "/problems/duplicate-idempotency-key"
    assert outcome["items"][4]["request"]["id"] == single["id"]
    first, second = outcome["items"][0]["request"], outcome["items"][1]["request"]
    assert first["sample_count"] == 3 and datetime.fromisoformat(second["due_at"]) == datetime.fromisoformat(
        early
    )
    # Three new requests (each with samples and a target), two new idempotency records; one open job.
    after = row_counts(session)
    assert [b - a for a, b in zip(before, after, strict=True)] == [3, 5, 3, 0, 2]
    assert len(set(dispatcher.dispatched)) == 1
    # The same call again: every accepted item replays, nothing is written.
    again = client.post("/deletion-requests/bulk", json={"items": items}).json()
    assert [item["replayed"] for item in again["items"]] == [True, True, False, False, True, False]
    assert again["items"][0]["request"] == first
    assert row_counts(session)[0] == after[0] + 1  # only the keyless item is a new request


def test_a_bulk_call_is_bounded(client: TestClient, model: dict[str, Any]) -> None:
    item = {"model": "toy-model", "sample_ids": ["s3"]}
    assert_problem(
        client.post("/deletion-requests/bulk", json={"items": [item] * 1001}), 422, "invalid-request"
    )
    assert_problem(client.post("/deletion-requests/bulk", json={"items": []}), 422, "invalid-request")


def test_a_bulk_call_coalesces_as_the_same_requests_posted_one_by_one(
    client: TestClient, model: dict[str, Any], settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    settings.batch_max_samples = 5
    items = [{"model": "toy-model", "sample_ids": [f"s{i}", f"s{i + 1}"]} for i in (0, 2, 4)]
    outcome = client.post("/deletion-requests/bulk", json={"items": items}).json()
    jobs = [job_of(item["request"]) for item in outcome["items"]]
    # 2 + 2 samples fill the first job; the third request would take it past 5: sealed, a new one opens.
    assert jobs[0] == jobs[1] != jobs[2]
    first, second = (client.get(f"/jobs/{job_id}").json() for job_id in (jobs[0], jobs[2]))
    assert (first["sample_count"], first["batch_open"]) == (4, False)
    assert (second["sample_count"], second["batch_open"]) == (2, True)
    assert sorted(set(dispatcher.dispatched)) == sorted({jobs[0], jobs[2]})
    assert client.get("/audit-trail/verification").json()["valid"]
