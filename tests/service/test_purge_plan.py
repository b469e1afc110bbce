"""What a purge plans and records, from the rows alone (no worker, no bytes): every subject a batch erased is
pseudonymised, rows are purged only once every model erased them, and the plan applies idempotently."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.settings import Settings
from service.datasets.tables import Sample
from service.deletion_requests.tables import DeletionRequest
from service.erasures import service as erasures_service
from service.jobs import service as jobs_service
from service.models import service as models_service
from service.purges import service as purges
from service.purges.pseudonyms import pseudonym_key, subject_hash
from service.storage import StoredObject
from tests.service.conftest import dataset_body, register_model, write_array


def _erase_in_one_job(
    client: TestClient, session: Session, settings: Settings, model: str, subjects: list[str]
) -> tuple[str, list[str]]:
    """The subjects' requests, coalesced into one job, erased as a worker would: returns (purge job, ids)."""
    requests = [
        client.post("/deletion-requests", json={"model": model, "subject_id": s}).json() for s in subjects
    ]
    [job_id] = {r["erasures"][0]["job_id"] for r in requests}
    claimed = jobs_service.claim_job(session, job_id, "w1", timedelta(seconds=60))
    assert isinstance(claimed, jobs_service.ClaimedJob)
    jobs_service.set_state(session, job_id, "evaluating")
    version = models_service.register_version(
        session, model_id=claimed.model_id, parent_version_id=claimed.base_version.id,
        stored=StoredObject(sha256="cd" * 32, size=3, uri="local:sha256/cd/" + "cd" * 31), method="retrain",
        config={}, metrics_before=None, metrics_after=None, activate=True, rejection_reason=None,
        job_id=job_id, request_ids=[t.request_id for t in claimed.targets],
    )  # fmt: skip
    purge = None
    for target, claimed_target in zip(
        erasures_service.targets_of_job(session, job_id), claimed.targets, strict=True
    ):
        purge = erasures_service.complete(
            session, settings, target, dataset_id=claimed.dataset_id, sample_ids=claimed_target.sample_ids,
            version_id=version.id, attempt={"job_id": job_id, "verdict": "forgotten"}, actor="w1",
        )  # fmt: skip
    jobs_service.finish(session, job_id, "succeeded", result_version_id=version.id)
    session.commit()
    assert purge is not None
    return purge.job_id, [r["id"] for r in requests]


def test_a_batch_of_subjects_is_pseudonymised_and_rows_wait_for_every_model(
    client: TestClient, session: Session, settings: Settings, tmp_path: Path
) -> None:
    body: dict[str, Any] = dataset_body(write_array(tmp_path / "two.npz", 10), name="two-subjects")
    for sample in body["samples"][3:5]:
        sample["subject_id"] = "bob"  # s0-s2 alice, s3-s4 bob
    dataset = client.post("/datasets", json=body).json()
    first = register_model(client, tmp_path, dataset["id"], name="first")
    register_model(client, tmp_path, dataset["id"], name="second")

    purge_job, request_ids = _erase_in_one_job(client, session, settings, "first", ["alice", "bob"])
    key = pseudonym_key(settings)
    plan = purges.plan(session, settings, key, purge_job, first["id"])
    record = plan.record
    # Both subjects of the batch, each by its own keyed hash; none of them in plain text.
    assert record.requests == {
        rid: subject_hash(key, dataset["id"], s) for rid, s in zip(request_ids, ["alice", "bob"], strict=True)
    }
    assert sorted(record.subjects.values()) == sorted(
        [subject_hash(key, dataset["id"], "alice")] * 3 + [subject_hash(key, dataset["id"], "bob")] * 2
    )
    assert [v["number"] for v in record.versions] == [1]  # the pre-erasure version, not the new one
    # The second model still holds the samples: their rows stay, and the record says so.
    assert plan.array_rows == [] and [k["count"] for k in record.kept if k["kind"] == "dataset_rows"] == [5]

    assert purges.apply(session, record, "test") == []
    assert purges.apply(session, record, "test") == []  # idempotent
    # As the worker ends it: the job takes the model, and ends with its record.
    assert jobs_service.claim_ready_purge(session, first["id"], "w1", timedelta(seconds=60)) is not None
    jobs_service.finish(session, purge_job, "succeeded", worker_id="w1", metrics={"purge": record.summary()})
    purges.finish_targets(session, record, "test")
    session.commit()
    requests = session.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(request_ids))).all()
    assert {r.subject_id for r in requests} == {None} and all(r.subject_hash for r in requests)
    assert {r.state for r in requests} == {"completed"}
    samples = session.scalars(select(Sample).where(Sample.dataset_id == dataset["id"])).all()
    assert {s.subject_id for s in samples if s.sample_id in {"s0", "s1", "s2", "s3", "s4"}} == {None}
    assert [s.subject_id for s in samples if s.sample_id == "s8"] == ["alice"]  # an audit sample: not erased
    # A repeated request for alice still finds her samples (by the keyed hash), and they are already erased.
    again = client.post("/deletion-requests", json={"model": "first", "subject_id": "alice"})
    assert again.status_code == 200 and again.json()["subject_id"] is None, again.text

    # Once the second model erases them too, the rows go.
    second_job, _ = _erase_in_one_job(client, session, settings, "second", ["alice", "bob"])
    second = client.get("/models/second").json()
    plan = purges.plan(session, settings, key, second_job, second["id"])
    assert len(plan.array_rows) == 5 and not [k for k in plan.record.kept if k["kind"] == "dataset_rows"]
