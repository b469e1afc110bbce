"""Erasure per model and coalescing, through the real Postgres and the worker pipeline (run in-process) on the
memorised digits: a request erases from the model it names only; a dataset-wide one fans out to every model
and completes when the last one has; a model registered later gets the erasure queued; a batch of requests is
one job, one version, one verdict and one report per request; a request that fails its audit inside a batch is
retried alone."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sqlalchemy import text

import worker.pipeline.audit as audit_stage
import worker.pipeline.purge as purge_stage
from service.core import logs
from service.deletion_requests import repository as requests_repository
from service.storage import ObjectNotFound, open_store
from tests.audit.memorised import RECIPE, SPEC
from tests.service.conftest import job_of
from tests.service.memorised_service import CHECKPOINT, MemorisedService, memorised_service
from worker.demo import erased_sample_ids

pytestmark = pytest.mark.slow

ACTIVE = ("queued", "running", "evaluating")
RETRAIN = {"method": "retrain", "config": {"epochs": RECIPE.epochs, "lr": RECIPE.lr, "seed": 12345}}


class Env(MemorisedService):
    next_row = 0

    def samples(self, count: int = 5) -> list[str]:
        """Train samples no test has used yet (5 of them: a data subject's worth)."""
        rows = self.case.remaining_rows[self.next_row : self.next_row + count]
        self.next_row += count
        return [self.case.dataset.sample_ids[r] for r in rows]

    def post(self, scope: dict[str, str], sample_ids: list[str], **extra: Any) -> dict[str, Any]:
        answer = self.client.post("/deletion-requests", json={**scope, "sample_ids": sample_ids, **extra})
        assert answer.status_code == 202, answer.text
        return dict(answer.json())

    def run(self, job_id: str) -> str:
        """Work as a worker would until ``job_id`` has ended (a message takes the most urgent ready job,
        which may be another one); its final state."""
        while (state := self.client.get(f"/jobs/{job_id}").json()["state"]) in ACTIVE:
            self.run_job(job_id)
        return str(state)

    def get(self, request: dict[str, Any]) -> dict[str, Any]:
        return dict(self.client.get(f"/deletion-requests/{request['id']}").json())

    def erased_everywhere(self) -> int:
        return int(
            self.client.get(f"/datasets/{self.dataset_id}").json()["samples"]["erased_from_every_model"]
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, module_database_url: str) -> Iterator[Env]:
    # What is tested here is where erasures go, not the audit's utility bounds (tests/audit has those); the
    # audit level is one no chance result reaches: only the test that forces a failure sees one.
    with memorised_service(
        tmp_path_factory.mktemp("erasures"), module_database_url, audit_references=4,
        gate_max_audit_drop=100.0, gate_max_class_drop=100.0, audit_level=1e-12,
    ) as service:  # fmt: skip
        environment = Env(**vars(service))
        environment.register_model("model-a")
        environment.register_model("model-b")
        yield environment


def test_erasure_from_one_model_leaves_the_other_holding_the_data(env: Env) -> None:
    ids = env.samples()
    first = env.post({"model": "model-a"}, ids, **RETRAIN)
    assert env.run(job_of(first)) == "succeeded", env.client.get(f"/jobs/{job_of(first)}").json()["error"]
    completed = env.get(first)
    assert completed["state"] == "completed"
    assert env.erased_everywhere() == 0  # model-b still holds them
    # Model-a's copies went (its version 1); the rows stay, since model-b still holds them, and the record
    # says so.
    record = completed["erasures"][0]["purge"]["record"]
    assert [c["number"] for c in record["checkpoints"]] == [1]
    assert record["dataset_rows_purged"] == 0
    assert [k["count"] for k in record["kept"] if k["kind"] == "dataset_rows"] == [len(ids)]
    # The same erasure for model-b is work for model-b: a job, not "already done".
    second = env.post({"model": "model-b"}, ids, **RETRAIN)
    [erasure] = second["erasures"]
    assert erasure["model"] == "model-b" and erasure["pending_count"] == len(ids) and erasure["job_id"]
    assert env.run(job_of(second)) == "succeeded"
    done = env.get(second)
    assert done["state"] == "completed"
    assert env.erased_everywhere() == len(ids)
    assert done["erasures"][0]["purge"]["record"]["dataset_rows_purged"] == len(ids)  # now nobody needs them
    samples = env.client.get(f"/datasets/{env.dataset_id}/samples", params={"limit": 500}).json()["items"]
    purged = [s for s in samples if s["sample_id"] in set(ids)]
    assert len(purged) == len(ids)
    assert all(s["purged_at"] and s["label"] is None and s["subject_id"] is None for s in purged)
    a = env.client.get("/models/model-a").json()["active_version"]
    b = env.client.get("/models/model-b").json()["active_version"]
    assert a["covered_request_ids"] == [first["id"]] and b["covered_request_ids"] == [second["id"]]
    assert a["erased_sample_count"] == b["erased_sample_count"] == len(ids)


def test_a_dataset_wide_request_fans_out_and_completes_when_every_model_has(env: Env) -> None:
    request = env.post({"dataset_id": env.dataset_id}, env.samples(), **RETRAIN)
    assert request["scope"] == "dataset" and request["model"] is None
    assert [e["model"] for e in request["erasures"]] == ["model-a", "model-b"]
    job_a, job_b = job_of(request, "model-a"), job_of(request, "model-b")
    assert job_a != job_b and set(env.dispatcher.dispatched) >= {job_a, job_b}
    assert env.run(job_a) == "succeeded"
    halfway = env.get(request)
    assert halfway["state"] == "processing" and halfway["completed_at"] is None
    assert [e["state"] for e in halfway["erasures"]] == ["completed", "pending"]
    assert env.client.get(f"/deletion-requests/{request['id']}/report").status_code == 404  # not settled
    assert env.run(job_b) == "succeeded"
    settled = env.get(request)
    assert settled["state"] == "completed" and [e["verdict"] for e in settled["erasures"]] != [None, None]
    report = env.client.get(f"/deletion-requests/{request['id']}/report").json()
    assert [e["model"]["name"] for e in report["erasures"]] == ["model-a", "model-b"]
    assert all(e["outcome"]["passed"] for e in report["erasures"])


def test_a_model_registered_later_gets_the_erasure_queued(env: Env) -> None:
    ids = env.samples()
    earlier = env.post({"dataset_id": env.dataset_id}, ids, **RETRAIN)
    late = env.register_model("model-late")  # while the request is open: its rows are still here
    for job_id in {e["job_id"] for e in earlier["erasures"]}:
        assert env.run(job_id) == "succeeded"

    notice = late["training_data"]
    assert notice["erasure_requested_samples_included"] >= len(ids)
    queued = [env.client.get(f"/deletion-requests/{rid}").json() for rid in notice["queued_request_ids"]]
    [carried] = [request for request in queued if request["origin_request_id"] == earlier["id"]]
    carried_id = carried["id"]
    assert carried["scope"] == "model" and carried["model"] == "model-late"
    assert carried["due_at"] == earlier["due_at"] and carried["sample_count"] == len(ids)
    assert env.run(job_of(carried)) == "succeeded"
    assert env.get(carried)["state"] == "completed"
    assert env.get(earlier)["state"] == "completed"
    assert set(ids) <= set(erased_sample_ids(env.client, env.dataset_id, carried_id))

    # Every model erased them: model-late's first checkpoint (trained on them) was purged and its bytes cannot
    # come back; their rows were purged, so a model declared trained on them is refused (Lethe could neither
    # unlearn nor audit them any more), and one that declares nothing is taken as trained on what is left.
    body = {"name": "model-too-late", "dataset_id": env.dataset_id, "spec": SPEC.to_dict(),
            "checkpoint_path": "model-late.safetensors"}  # fmt: skip
    refused = env.client.post("/models", json=body)
    assert refused.status_code == 409 and refused.json()["type"].endswith("checkpoint-purged")
    other = _other_checkpoint(env)
    declared = {**body, "checkpoint_path": other, "training_sample_ids": ids}
    refused = env.client.post("/models", json=declared)
    assert refused.status_code == 409 and refused.json()["type"].endswith("trained-on-purged-samples")
    versions = env.client.get("/models/model-late/versions").json()["items"]
    first = next(v for v in versions if v["number"] == 1)
    assert first["status"] == "purged"
    gone = env.client.get("/models/model-late/versions/1/checkpoint")
    assert gone.status_code == 410 and gone.json()["type"].endswith("checkpoint-purged")

    # A model registered now holds none of the purged samples: nothing is queued for it.
    clean = env.register_model("model-clean", checkpoint_path=other)
    assert earlier["id"] not in [
        env.client.get(f"/deletion-requests/{rid}").json()["origin_request_id"]
        for rid in clean["training_data"]["queued_request_ids"]
    ]
    declared = clean["training_data"]["declared_training_samples"]
    assert declared <= len(env.case.dataset.train_rows) - len(ids)


def test_a_failed_purge_is_retried_and_the_request_waits_for_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> list[str]:
        raise OSError("the store is down")

    monkeypatch.setattr(purge_stage.purges, "delete_objects", broken)
    request = env.post({"model": "model-a"}, env.samples(), **RETRAIN)
    assert env.run(job_of(request)) == "succeeded"
    waiting = env.get(request)
    assert waiting["state"] == "processing" and waiting["erasures"][0]["purge"]["state"] == "failed"
    failed_job = waiting["erasures"][0]["purge"]["job_id"]
    assert env.client.get(f"/jobs/{failed_job}").json()["error"]["reason"] == "purge_error"
    monkeypatch.undo()
    with env.session_factory.begin() as session:  # the retry's wait (LETHE_PURGE_RETRY_S) has passed
        retry = session.scalars(
            text("SELECT id FROM jobs WHERE kind = 'purge' AND state = 'queued' AND model_id = :m"),
            {"m": waiting["erasures"][0]["model_id"]},
        ).one()
        session.execute(text("UPDATE jobs SET ready_at = now() WHERE id = :id"), {"id": retry})
    assert env.run(retry) == "succeeded"
    done = env.get(request)
    assert done["state"] == "completed" and done["erasures"][0]["purge"]["job_id"] == retry


def test_references_forget_too_and_are_rebuilt_once_enough_of_them_was_erased(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env.settings, "audit_references_refresh_share", 0.001)
    request = env.post({"model": "model-b"}, env.samples(), **RETRAIN)
    assert env.run(job_of(request)) == "succeeded"
    old = env.client.get("/models/model-b/audit-references").json()
    assert old["summary"]["columns_purged"] >= 5  # this request's samples at least
    with env.session_factory() as session:  # the purge found the set stale and queued its rebuild
        build = session.scalars(
            text("SELECT id FROM jobs WHERE kind = 'build_references' AND state = 'queued'")
        ).one()
    assert env.run(build) == "succeeded"
    new = env.client.get("/models/model-b/audit-references").json()
    assert new["id"] != old["id"] and "columns_purged" not in new["summary"]
    with env.session_factory() as session:  # and the rebuild queued the purge of the set it replaces
        purge = session.scalars(text("SELECT id FROM jobs WHERE kind = 'purge' AND state = 'queued'")).one()
    assert env.run(purge) == "succeeded"
    with env.session_factory() as session:
        purged_at = session.scalar(
            text("SELECT purged_at FROM audit_reference_sets WHERE id = :i"), {"i": old["id"]}
        )
    assert purged_at is not None
    digest = old["checkpoint_sha256"]
    with pytest.raises(ObjectNotFound):
        open_store(env.settings.storage_url).read(f"local:sha256/{digest[:2]}/{digest[2:]}")


def _other_checkpoint(env: Env) -> str:
    """A checkpoint of the same architecture with other bytes (one weight moved)."""
    tensors = load_safetensors((env.tmp / CHECKPOINT).read_bytes())
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(1e-3)
    (env.tmp / "other.safetensors").write_bytes(save_safetensors(tensors))
    return "other.safetensors"


def test_a_batch_of_requests_is_one_job_one_version_and_a_verdict_each(env: Env) -> None:
    requests = [env.post({"model": "model-a"}, env.samples(), **RETRAIN) for _ in range(4)]
    [job_id] = {job_of(request) for request in requests}  # coalesced
    job = env.client.get(f"/jobs/{job_id}").json()
    assert job["request_ids"] == sorted(r["id"] for r in requests) or len(job["request_ids"]) == 4
    assert env.run(job_id) == "succeeded"
    job = env.client.get(f"/jobs/{job_id}").json()
    assert set(job["metrics"]["audits"]) == {r["id"] for r in requests}
    versions = env.client.get("/models/model-a/versions").json()["items"]
    made = [v for v in versions if v["created_by_job_id"] == job_id]
    assert len(made) == 1 and set(made[0]["covered_request_ids"]) == {r["id"] for r in requests}
    purges = set()
    for request in requests:
        settled = env.get(request)
        assert (
            settled["state"] == "completed" and settled["erasures"][0]["result_version"] == made[0]["number"]
        )
        assert settled["erasures"][0]["purge"]["state"] == "done"
        purges.add(settled["erasures"][0]["purge"]["job_id"])
        assert (
            settled["erasures"][0]["audit"]["verdict"] == job["metrics"]["audits"][request["id"]]["verdict"]
        )
        report = env.client.get(f"/deletion-requests/{request['id']}/report").json()
        assert report["erasures"][0]["job"]["requests_in_job"] == 4
        assert report["samples"]["count"] == 5
    assert len(purges) == 1  # one purge job for the batch's requests


def _force_failure(monkeypatch: pytest.MonkeyPatch, sample_ids: set[str]) -> None:
    """The audit of a request whose samples are all in ``sample_ids`` fails (residual membership)."""
    real_audit = audit_stage.audit_unlearning

    def audit(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = real_audit(*args, **kwargs)
        if set(kwargs["forget_sample_ids"]) <= sample_ids:
            result["verdict"] = "residual_membership"
            result["gate"] = {**result["gate"], "passed": False, "failures": ["residual membership (forced)"]}
        return result

    monkeypatch.setattr(audit_stage, "audit_unlearning", audit)


def test_failures_in_a_batch_are_retried_together_by_exact_retraining(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    finetune = {"method": "finetune", "config": {"epochs": 1}}
    failing = [env.post({"model": "model-b"}, env.samples(), **finetune) for _ in range(2)]
    passing = env.post({"model": "model-b"}, env.samples(), **finetune)
    _force_failure(monkeypatch, {s for request in failing for s in named_samples(env, request)})
    batch = job_of(passing)
    assert {job_of(request) for request in failing} == {batch}
    assert env.run(batch) == "succeeded"  # the version goes live for the request that passed
    assert env.get(passing)["state"] == "completed"
    retried = [env.get(request) for request in failing]
    assert all(r["state"] == "processing" and r["erasures"][0]["state"] == "pending" for r in retried)
    assert all(
        [a["verdict"] for a in r["erasures"][0]["attempts"]] == ["residual_membership"] for r in retried
    )
    [escalation] = {r["erasures"][0]["job_id"] for r in retried}  # one job for the batch's failures
    job = env.client.get(f"/jobs/{escalation}").json()
    # Open to the failures of the model's next batches too: exact retraining has no batch effects.
    assert sorted(job["request_ids"]) == sorted(r["id"] for r in failing) and job["batch_open"]
    # Exact retraining with the model's own recipe, from a fresh initialisation.
    assert job["method"] == "retrain" and job["config"]["epochs"] == RECIPE.epochs
    assert job["config"]["seed"] == 1
    assert env.run(escalation) == "rejected"  # the forced failure again: retried once, then rejected
    for request in failing:
        final = env.get(request)
        assert final["state"] == "rejected" and len(final["erasures"][0]["attempts"]) == 2
        assert erased_sample_ids(env.client, env.dataset_id, request["id"]) == []
        report = env.client.get(f"/deletion-requests/{request['id']}/report").json()
        attempts = report["erasures"][0]["attempts"]
        assert [a["method"] for a in attempts] == ["finetune", "retrain"]
        assert not report["erasures"][0]["outcome"]["passed"]


def test_without_escalation_a_failure_in_a_batch_is_retried_alone(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env.settings, "escalation_method", "")
    finetune = {"method": "finetune", "config": {"epochs": 1}}
    failing, passing = (env.post({"model": "model-a"}, env.samples(), **finetune) for _ in range(2))
    _force_failure(monkeypatch, set(named_samples(env, failing)))
    batch = job_of(failing)
    assert job_of(passing) == batch and env.run(batch) == "succeeded"
    [erasure] = env.get(failing)["erasures"]
    alone = env.client.get(f"/jobs/{erasure['job_id']}").json()
    assert (
        alone["request_ids"] == [failing["id"]] and alone["method"] == "finetune" and not alone["batch_open"]
    )
    monkeypatch.undo()  # alone it passes
    assert env.run(erasure["job_id"]) == "succeeded"
    final = env.get(failing)
    assert final["state"] == "completed" and [a["passed"] for a in final["erasures"][0]["attempts"]] == [
        False, True
    ]  # fmt: skip


def named_samples(env: Env, request: dict[str, Any]) -> list[str]:
    with env.session_factory() as session:
        return requests_repository.all_sample_ids(session, request["id"])


def _scrape(env: Env) -> dict[str, float]:
    """Every sample of ``GET /metrics`` (no token: a scraper's view), keyed by name and labels."""
    answer = env.client.get("/metrics", headers={"Authorization": ""})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_follow_a_request_through_its_job(env: Env) -> None:
    before = _scrape(env)
    request = env.post({"model": "model-a"}, env.samples(), **RETRAIN)
    queued = _scrape(env)

    def moved(after: dict[str, float], key: str, since: dict[str, float] = before) -> float:
        return after.get(key, 0.0) - since.get(key, 0.0)

    assert moved(queued, "lethe_queue_depth") == 1 and queued["lethe_queue_oldest_age_seconds"] >= 0
    assert moved(queued, "lethe_deletion_requests,state=processing") == 1
    assert moved(queued, "lethe_open_requests_by_days_left,days_left=14-30") == 1  # due in 30 days
    post = "lethe_http_requests_total,method=POST,route=/deletion-requests,status=202"
    assert moved(queued, post) == 1
    assert env.run(job_of(request)) == "succeeded"
    after = _scrape(env)
    # The unlearning job, and the purge job the same worker ran right after it.
    assert moved(after, "lethe_queue_depth") == 0 and moved(after, "lethe_jobs,state=succeeded") == 2
    assert moved(after, "lethe_deletion_requests,state=processing") == 0
    assert moved(after, "lethe_deletion_requests,state=completed") == 1
    assert moved(after, "lethe_open_requests_by_days_left,days_left=14-30") == 0
    verdicts = [key for key in after if key.startswith("lethe_audit_verdicts,")]
    assert sum(moved(after, key) for key in verdicts) == 1
    latency = "lethe_http_request_duration_seconds_count,method=POST,route=/deletion-requests"
    assert moved(after, latency) == 1


def test_log_lines_follow_a_request_from_the_api_into_its_job(env: Env) -> None:
    """JSON lines: the API's carry the request id (kept from X-Request-ID, echoed back), the job's carry its
    id, model and deletion requests."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs._AddContext())
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        answer = env.client.post(
            "/deletion-requests", json={"model": "model-a", "sample_ids": env.samples(), **RETRAIN},
            headers={"X-Request-ID": "backend-req-42"},
        )  # fmt: skip
        assert answer.status_code == 202 and answer.headers["x-request-id"] == "backend-req-42"
        generated = env.client.get("/jobs", headers={"X-Request-ID": "bad id with spaces"})
        assert generated.headers["x-request-id"] != "bad id with spaces"
        assert env.run(job_of(answer.json())) == "succeeded"
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "lethe.access" and line["method"] == "POST"]
    assert access and access[0]["request_id"] == "backend-req-42" and access[0]["status"] == 202
    job_lines = [line for line in lines if line.get("job_id") == job_of(answer.json())]
    assert any(line["logger"].startswith("worker.pipeline") for line in job_lines), lines[-5:]
    assert all(
        line["model"] == "model-a" and line["deletion_request_ids"] == [answer.json()["id"]]
        for line in job_lines
    )
