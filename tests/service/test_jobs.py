from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.core.clock import utcnow
from service.core.settings import Settings
from service.erasures import service as erasures_service
from service.jobs import service as jobs_service
from service.jobs.tables import Job
from service.models import service as models_service
from service.storage import StoredObject
from tests.service.conftest import RecordingDispatcher, dataset_body, job_of, register_model, write_array
from tests.service.test_datasets import assert_problem
from worker.engine.config import DEFAULT_METHOD, config_to_dict, make_config

LEASE = timedelta(minutes=2)


def submit(client: TestClient, *sample_ids: str, model: str = "toy-model", **extra: Any) -> str:
    body = {"model": model, "sample_ids": list(sample_ids), **extra}
    response = client.post("/deletion-requests", json=body)
    assert response.status_code == 202, response.text
    return job_of(response.json())


@pytest.fixture
def one_request_per_job(settings: Settings) -> None:
    settings.batch_max_samples = 1  # no coalescing: every request fills its own job


@pytest.fixture
def second_model(client: TestClient, tmp_path: Path) -> dict[str, Any]:
    other = client.post("/datasets", json=dataset_body(write_array(tmp_path / "b.npz", 10), name="b")).json()
    return register_model(client, tmp_path, other["id"], name="model-b")


@pytest.mark.usefixtures("one_request_per_job")
def test_jobs_are_listed_newest_first_with_cursor_pagination_and_filters(
    client: TestClient, model: dict[str, Any], second_model: dict[str, Any]
) -> None:
    created = [submit(client, f"s{i}") for i in range(5)] + [submit(client, "s0", model="model-b")]
    client.post(f"/jobs/{created[0]}/cancel")
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params).json()
        pages.append([job["id"] for job in page["items"]])
        if (cursor := page["next_cursor"]) is None:
            break
    assert [len(p) for p in pages] == [2, 2, 2]
    assert [job_id for p in pages for job_id in p] == list(reversed(created))
    only_a = client.get("/jobs", params={"model": "toy-model"}).json()["items"]
    assert [job["id"] for job in only_a] == list(reversed(created[:5]))
    canceled = client.get("/jobs", params={"state": "canceled"}).json()["items"]
    assert [job["id"] for job in canceled] == [created[0]]
    # The document states each filter's domain (a state enum, a cursor pattern): outside it, 422.
    assert_problem(client.get("/jobs", params={"state": "sleeping"}), 422, "invalid-request")
    assert_problem(client.get("/jobs", params={"cursor": "WyJ4Il0"}), 422, "invalid-request")
    assert_problem(client.get("/jobs", params={"model": "nope"}), 404, "model-not-found")
    # Every cursor the pattern allows is a place in the list: before the first job, an empty page.
    assert client.get("/jobs", params={"cursor": "0.0"}).json() == {"items": [], "next_cursor": None}


@pytest.mark.usefixtures("one_request_per_job")
def test_cancel_semantics(client: TestClient, session: Session, model: dict[str, Any]) -> None:
    queued, running = submit(client, "s1"), submit(client, "s2", model="toy-model")
    canceled = client.post(f"/jobs/{queued}/cancel")
    assert canceled.status_code == 202 and canceled.json()["state"] == "canceled"
    assert canceled.json()["error"]["reason"] == "canceled"
    [request_id] = canceled.json()["request_ids"]
    request = client.get(f"/deletion-requests/{request_id}").json()
    assert request["state"] == "canceled" and request["erasures"][0]["state"] == "canceled"
    assert_problem(client.post(f"/jobs/{queued}/cancel"), 409, "job-finished")

    assert isinstance(jobs_service.claim_job(session, running, "w1", LEASE), jobs_service.ClaimedJob)
    session.commit()
    flagged = client.post(f"/jobs/{running}/cancel")
    assert flagged.status_code == 202
    assert flagged.json()["state"] == "running" and flagged.json()["cancel_requested"] is True
    assert jobs_service.record_progress(session, running, {"step": 3}, "w1", LEASE) is True
    jobs_service.finish(
        session, running, "canceled", error_reason="canceled", error_detail="stopped", worker_id="w1"
    )
    session.commit()
    assert client.get(f"/jobs/{running}").json()["done"] is True
    assert_problem(client.get("/jobs/nope"), 404, "job-not-found")
    assert_problem(client.post("/jobs/nope/cancel"), 404, "job-not-found")


@pytest.mark.usefixtures("one_request_per_job")
def test_claim_runs_a_job_once_and_serialises_jobs_of_one_model(
    client: TestClient, session: Session, model: dict[str, Any], second_model: dict[str, Any]
) -> None:
    first, second = submit(client, "s1", "s2"), submit(client, "s3")
    other_model_job = submit(client, "s1", model="model-b")

    claimed = jobs_service.claim_job(session, first, "w1", LEASE)
    assert isinstance(claimed, jobs_service.ClaimedJob) and claimed.job_id == first
    assert claimed.forget_sample_ids == ("s1", "s2") and claimed.state == "running"
    assert claimed.base_version.id == model["active_version"]["id"] and claimed.model_name == "toy-model"
    assert claimed.array_uri.startswith("local:sha256/") and claimed.config == config_to_dict(
        make_config(DEFAULT_METHOD)
    )
    session.commit()
    # A message is a ticket: redelivered, it cannot run the job again; the second job's model is busy, so
    # it takes the other model's job, which is ready.
    taken = jobs_service.claim_job(session, first, "w2", LEASE)
    assert isinstance(taken, jobs_service.ClaimedJob) and taken.job_id == other_model_job
    session.commit()
    assert session.get(Job, second).state == "queued"  # type: ignore[union-attr]
    # Nothing else is ready: the message is dropped; ending the model's running job sends one on.
    assert jobs_service.claim_job(session, second, "w3", LEASE) is None
    assert jobs_service.next_queued(session, model["id"]) == (second, 0.0)
    for job_id in (first, other_model_job):
        jobs_service.finish(session, job_id, "failed", error_reason="test")
    assert isinstance(jobs_service.claim_job(session, first, "w3", LEASE), jobs_service.ClaimedJob)
    assert jobs_service.claim_job(session, first, "w3", LEASE) is None  # nothing left to do


@pytest.mark.usefixtures("one_request_per_job")
def test_workers_take_the_earliest_due_date_first(
    client: TestClient, session: Session, model: dict[str, Any], second_model: dict[str, Any]
) -> None:
    later = submit(client, "s1")
    soon = (utcnow() + timedelta(days=3)).isoformat()
    urgent = submit(client, "s2", model="model-b", due_at=soon)
    claimed = jobs_service.claim_job(session, later, "w1", LEASE)  # any message takes the most urgent job
    assert isinstance(claimed, jobs_service.ClaimedJob) and claimed.job_id == urgent
    assert client.get(f"/jobs/{urgent}").json()["due_at"].startswith(soon[:19])


def test_requests_coalesce_until_the_job_is_full_or_claimed(
    client: TestClient, session: Session, model: dict[str, Any], settings: Settings,
    dispatcher: RecordingDispatcher,
) -> None:  # fmt: skip
    settings.batch_max_samples, settings.batch_wait_s = 4, 30
    first = submit(client, "s1", "s2")
    assert submit(client, "s3") == first and dispatcher.dispatched == [first] and dispatcher.delays == [30]
    assert isinstance(jobs_service.claim_job(session, first, "w1", LEASE), jobs_service.NotReady)  # waiting
    assert submit(client, "s4") == first  # full now: ready at once, a second message says so
    assert dispatcher.dispatched == [first, first] and dispatcher.delays[-1] == 0
    overflow = submit(client, "s5")  # a full job takes no more
    assert overflow != first
    job = client.get(f"/jobs/{first}").json()
    assert (job["sample_count"], job["batch_open"], len(job["request_ids"])) == (4, False, 3)
    claimed = jobs_service.claim_job(session, first, "w1", LEASE)
    assert isinstance(claimed, jobs_service.ClaimedJob) and claimed.job_id == first
    assert claimed.forget_sample_ids == ("s1", "s2", "s3", "s4") and len(claimed.targets) == 3
    session.commit()
    # A request that arrives while the model's job runs joins the next one.
    assert submit(client, "s6") == overflow


def test_a_job_runs_to_success_through_the_worker_api(
    client: TestClient, session: Session, model: dict[str, Any], settings: Settings
) -> None:
    job_id = submit(client, "s1", "s2")
    claimed = jobs_service.claim_job(session, job_id, "w1", LEASE)
    assert isinstance(claimed, jobs_service.ClaimedJob)
    progress = {"step": 5, "total_steps": 10, "epoch": 1, "total_epochs": 2, "losses": {"total": 0.5}}
    assert jobs_service.record_progress(session, job_id, progress, "w1", LEASE) is False
    assert jobs_service.record_progress(session, job_id, progress, "intruder", LEASE) is True  # not its job
    jobs_service.set_state(session, job_id, "evaluating", worker_id="w1")
    with pytest.raises(jobs_service.InvalidTransition):
        jobs_service.set_state(session, job_id, "running")
    version = models_service.register_version(
        session,
        model_id=claimed.model_id,
        parent_version_id=claimed.base_version.id,
        stored=StoredObject(sha256="ab" * 32, size=3, uri="local:sha256/ab/" + "ab" * 31),
        method=claimed.method,
        config=claimed.config,
        metrics_before={"audit_accuracy": 90.0},
        metrics_after={"audit_accuracy": 89.0},
        activate=True,
        rejection_reason=None,
        job_id=job_id,
        request_ids=[claimed.targets[0].request_id],
    )
    [target] = erasures_service.targets_of_job(session, job_id)
    purge = erasures_service.complete(
        session, settings, target, dataset_id=claimed.dataset_id, sample_ids=claimed.forget_sample_ids,
        version_id=version.id, attempt={"job_id": job_id, "verdict": "forgotten"}, actor="w1",
    )  # fmt: skip
    jobs_service.finish(
        session, job_id, "succeeded", metrics={"gate": "passed"}, result_version_id=version.id
    )
    session.commit()

    job = client.get(f"/jobs/{job_id}").json()
    assert (
        job["state"] == "succeeded" and job["result_version_id"] == version.id and job["progress"] == progress
    )
    timings = job["timings"]
    assert timings["queued_seconds"] >= 0 and timings["running_seconds"] >= 0 and timings["finished_at"]
    request_id = claimed.targets[0].request_id
    request = client.get(f"/deletion-requests/{request_id}").json()
    # Erased from the model, but not completed until its purge job has deleted the copies that hold them.
    assert request["state"] == "processing" and request["completed_at"] is None
    assert request["erasures"][0]["purge"]["state"] == "scheduled"
    assert request["erasures"][0]["purge"]["job_id"] == purge.job_id
    assert request["erasures"][0]["result_version"] == 2 and request["erasures"][0]["verdict"] == "forgotten"
    active = client.get("/models/toy-model").json()["active_version"]
    assert active["number"] == 2 and active["covered_request_ids"] == [request_id]
    assert active["created_by_job_id"] == job_id and active["erased_sample_count"] == 2
    samples = client.get(f"/datasets/{claimed.dataset_id}/samples").json()["items"]
    erased = {s["sample_id"]: s["erased_from"] for s in samples if s["erased_from"]}
    assert erased.keys() == {"s1", "s2"}
    assert all(e == [{**e[0], "model_id": model["id"], "version_id": version.id}] for e in erased.values())
    assert all(s["erased_from_every_model"] for s in samples if s["erased_from"])


def test_a_lapsed_lease_lets_another_worker_resume(
    client: TestClient, session: Session, model: dict[str, Any]
) -> None:
    job_id = submit(client, "s1")
    jobs_service.claim_job(session, job_id, "dead", LEASE)
    jobs_service.set_state(
        session, job_id, "evaluating", metrics={"checkpoint": {"sha256": "x"}}, worker_id="dead"
    )
    assert jobs_service.claim_job(session, job_id, "w2", LEASE) is None  # the lease is live
    job = session.get(Job, job_id)
    assert job is not None
    job.lease_expires_at = utcnow() - timedelta(seconds=1)
    session.flush()
    assert jobs_service.list_abandoned(session) == [job_id]
    resumed = jobs_service.claim_job(session, job_id, "w2", LEASE)
    assert isinstance(resumed, jobs_service.ClaimedJob)
    assert resumed.state == "evaluating" and resumed.resume == {"checkpoint": {"sha256": "x"}}
    with pytest.raises(jobs_service.InvalidTransition):
        jobs_service.finish(session, job_id, "failed", error_reason="x", worker_id="dead")


@pytest.mark.usefixtures("one_request_per_job")
def test_stale_queued_jobs_are_found_for_the_sweeper(
    client: TestClient, session: Session, model: dict[str, Any]
) -> None:
    job_id = submit(client, "s1")
    assert jobs_service.list_stale_queued(session, utcnow() - timedelta(minutes=5)) == []
    assert jobs_service.list_stale_queued(session, utcnow() + timedelta(seconds=1)) == [job_id]


def test_canceling_a_large_batch_settles_it_in_chunks_and_resumes_when_cut_short(
    client: TestClient, session: Session, model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_service, "SETTLE_CHUNK", 3)
    job_id = submit(client, "s0")
    assert {submit(client, f"s{i}") for i in range(1, 7)} == {job_id}  # seven requests, one open job
    canceled = client.post(f"/jobs/{job_id}/cancel")
    assert canceled.status_code == 202 and canceled.json()["state"] == "canceled"
    progress = canceled.json()["progress"]
    assert (progress["phase"], progress["settled"], progress["total"]) == ("settling", 7, 7)
    for request_id in canceled.json()["request_ids"]:
        request = client.get(f"/deletion-requests/{request_id}").json()
        assert request["state"] == "canceled" and request["erasures"][0]["state"] == "canceled"
    assert_problem(client.post(f"/jobs/{job_id}/cancel"), 409, "job-finished")
    # A cancel cut short (the API stopped between chunks) leaves the rest pending: canceling again goes on.
    cut_short = submit(client, "s0")
    assert {submit(client, f"s{i}") for i in range(1, 5)} == {cut_short}
    jobs_service.request_cancel(session, cut_short, "acme", "test")  # the first transaction only
    session.commit()
    assert client.get(f"/jobs/{cut_short}").json()["progress"]["settled"] == 3
    resumed = client.post(f"/jobs/{cut_short}/cancel").json()
    assert resumed["progress"]["settled"] == resumed["progress"]["total"] == 5
    assert client.get("/audit-trail/verification").json()["valid"]
