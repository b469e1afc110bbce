"""End to end: real Postgres (fresh database, migrations applied), real Redis, a real Celery worker process.

The digits dataset (8x8) and a small model keep each job to a few seconds; each model's first job builds its
audit reference set (4 references, the model's 2-epoch recipe). The worker runs with a lenient audit gate
(this file tests the plumbing; tests/service/test_audit_pipeline.py tests the gate's evidence); the gate's
rejection runs the same pipeline in-process with impossible thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.core.database import make_engine, make_session_factory
from service.core.settings import Settings
from service.dispatch import CeleryDispatcher
from service.jobs.tables import Job
from service.storage import ObjectStore, S3Store, open_store, worker_store
from tests.service.conftest import RecordingDispatcher, authorize, job_of
from worker.bench.common import free_port, new_bucket_url
from worker.datasets.builtin import load_dataset
from worker.demo import (
    SAMPLES_PER_SUBJECT,
    dataset_body,
    erased_sample_ids,
    train_initial_checkpoint,
    write_dataset,
)
from worker.engine.config import DEFAULT_METHOD, TrainingConfig
from worker.engine.spec import ModelSpec
from worker.pipeline import run_job
from worker.tasks import message_job_ids, sweep

pytestmark = pytest.mark.slow

SPEC = ModelSpec("mnist_cnn", 10, (1, 8, 8), "features.block2")
# The default method (repair) at its cheapest: one pass over the remaining data, no floor of steps.
FAST = {"epochs": 1, "min_steps": 0}
TIMEOUT_S = 90


@dataclass
class Env:
    settings: Settings  # what the API and the worker share
    session_factory: sessionmaker[Session]
    redis: redis.Redis
    dataset_id: str
    checkpoint_path: Path
    dispatcher: CeleryDispatcher
    client: TestClient  # the API, dispatching to Celery
    worker_log: Path
    worker_env: dict[str, str]
    store: str  # "local": one directory for all; "s3": nothing shared but the bucket
    tmp: Path

    def register_model(self) -> str:
        """A model of the initial weights, in checkpoint bytes of its own (its name in the file's metadata):
        once a model's first version is purged its bytes are refused, and must not be another model's."""
        name = f"digits-{uuid.uuid4().hex[:8]}"
        own = self.tmp / f"{name}.safetensors"
        initial = load_safetensors(self.checkpoint_path.read_bytes())
        own.write_bytes(save_safetensors(initial, metadata={"test_model": name}))
        if self.store == "s3":  # uploaded: the API never reads a path the client names
            form = {"name": name, "dataset_id": self.dataset_id, "spec": json.dumps(SPEC.to_dict()),
                    "training_recipe": json.dumps({"epochs": 2})}  # fmt: skip
            files = {"checkpoint": ("initial.safetensors", own.read_bytes())}
            answer = self.client.post("/models/upload", data=form, files=files)
        else:
            body = {"name": name, "dataset_id": self.dataset_id, "spec": SPEC.to_dict(),
                    "checkpoint_path": str(own),
                    "training_recipe": {"epochs": 2}}  # fmt: skip
            answer = self.client.post("/models", json=body)
        assert answer.status_code == 201, answer.text
        return name

    def job_store(self, settings: Settings) -> ObjectStore:
        """The store as a worker in this process reads it (an S3 store through a cache of its own)."""
        return worker_store(settings.storage_url, self.tmp / "test-cache", settings.cache_max_bytes)

    def start_worker(self, name: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        """A worker process; with S3, in an empty directory of its own (its cwd and cache), sharing no path
        with the API or another worker."""
        directory = self.tmp / f"worker-{name}"
        directory.mkdir()
        worker_env = {**self.worker_env, "LETHE_CACHE_DIR": str(directory / "cache"), **env}
        log = self.tmp / f"worker-{name}.log"
        return start_worker(worker_env, log, name, cwd=directory), log

    def request(self, model: str, subject: str, config: dict[str, Any] = FAST) -> dict[str, Any]:
        answer = self.client.post(
            "/deletion-requests", json={"model": model, "subject_id": subject, "config": config}
        )
        assert answer.status_code == 202, answer.text
        return {**answer.json(), "http_request_id": answer.headers["x-request-id"]}

    def wait_job(self, job_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.client.get(f"/jobs/{job_id}").json()
            if done(job):
                return job
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id} stuck in {job['state']}; worker log:\n{self.worker_log.read_text()[-4000:]}"
        )

    def wait_completed(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request once completed: its job succeeded and the purge that follows it has run."""
        deadline = time.monotonic() + TIMEOUT_S
        while (answer := self.client.get(f"/deletion-requests/{request['id']}").json())[
            "state"
        ] != "completed":
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)
        return dict(answer)

    def versions(self, model: str) -> list[dict[str, Any]]:
        return list(self.client.get(f"/models/{model}/versions").json()["items"])


@pytest.fixture(scope="module", params=["local", "s3"])
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, module_database_url: str
) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp(f"e2e-{request.param}")
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
        storage_url = new_bucket_url()
    else:
        storage_url = str(tmp / "store")
    database_url = module_database_url
    # A Redis database of its own, so parallel runs and other users of this Redis do not share the queue.
    redis_url = f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    settings = Settings(
        database_url=database_url, redis_url=redis_url, storage_url=storage_url, dispatcher="celery",
        audit_references=4, audit_level=1e-12, gate_max_class_drop=100.0, batch_wait_s=0, data_dir=tmp,
    )  # fmt: skip
    worker_env = {
        **os.environ,
        "LETHE_DATABASE_URL": database_url,
        "LETHE_REDIS_URL": redis_url,
        "LETHE_STORAGE_URL": settings.storage_url,
        "LETHE_TORCH_THREADS": "1",
        "LETHE_PROGRESS_INTERVAL_S": "0.2",
        "LETHE_GATE_MAX_AUDIT_DROP": "100",
        "LETHE_GATE_MAX_CLASS_DROP": "100",
        "LETHE_AUDIT_LEVEL": "1e-12",
        "LETHE_AUDIT_REFERENCES": "4",
        "OMP_NUM_THREADS": "1",
        "LETHE_BATCH_WAIT_S": "0",
        "LETHE_WORKER_METRICS_PORT": str(free_port()),
    }
    dataset = load_dataset("digits")
    array_path = tmp / "digits.npz"
    write_dataset(dataset, array_path)
    checkpoint_path = tmp / "initial.safetensors"
    checkpoint_path.write_bytes(train_initial_checkpoint(dataset, SPEC, TrainingConfig(epochs=5)))
    engine = make_engine(database_url)
    session_factory = make_session_factory(engine)
    try:
        dispatcher = CeleryDispatcher(redis_url)
        with TestClient(create_app(settings, dispatcher, session_factory=session_factory)) as api:
            authorize(api, tenant=f"e2e-{request.param}")  # one tenant per store: the database is shared
            body = dataset_body(dataset, array_path)
            if request.param == "s3":  # by its key in the bucket, where the client put it
                store = open_store(storage_url)
                assert isinstance(store, S3Store)
                store._client.upload_file(str(array_path), store.bucket, f"{store.prefix}inputs/digits.npz")
                body = {**{k: v for k, v in body.items() if k != "array_path"}, "array_object": "digits.npz"}
            answer = api.post("/datasets", json=body)
            assert answer.status_code == 201, answer.text
            environment = Env(
                settings, session_factory, client, answer.json()["id"], checkpoint_path, dispatcher, api,
                tmp / "worker-w1.log", worker_env, request.param, tmp,
            )  # fmt: skip
            worker, _log = environment.start_worker("w1")
            try:
                yield environment
            finally:
                worker.terminate()
                worker.wait(timeout=30)
    finally:
        engine.dispose()
        client.flushdb()


def start_worker(
    worker_env: dict[str, str], log_path: Path, name: str, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """A Celery worker process on the ``gpu`` queue taking one job at a time, as on one GPU."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1",
             "--pool", "solo", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
             "-n", f"{name}@%h"],
            env=worker_env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
        )  # fmt: skip


def _done(job: dict[str, Any]) -> bool:
    return bool(job["done"])


def test_requests_produce_a_lineage_of_active_versions(env: Env) -> None:
    model = env.register_model()
    [initial] = env.versions(model)

    first = env.request(model, "subject-0001")
    job = env.wait_job(job_of(first), _done)
    assert job["state"] == "succeeded", job
    assert job["metrics"]["gate"]["passed"]
    env.wait_completed(first)
    v1, v2 = env.versions(model)
    assert (v1["status"], v2["status"]) == ("purged", "active")  # v1 held the subject: deleted
    assert v2["parent_id"] == initial["id"] and job["result_version_id"] == v2["id"]
    assert v2["covered_request_ids"] == [first["id"]]
    assert v2["metrics_before"]["audit_accuracy"] > 50  # the initial model learnt something
    forgotten = erased_sample_ids(env.client, env.dataset_id, first["id"])
    assert len(forgotten) == first["sample_count"] == SAMPLES_PER_SUBJECT
    # The worker's own series, on its metrics port: the job's phases and its outcome.
    scraped = httpx.get(f"http://127.0.0.1:{env.worker_env['LETHE_WORKER_METRICS_PORT']}/metrics").text
    for phase in ("load", "unlearn", "audit", "register"):
        assert (
            f'lethe_job_phase_seconds_count{{kind="unlearn",method="{DEFAULT_METHOD}",phase="{phase}"}}'
            in scraped
        )
    assert f'lethe_worker_jobs_total{{kind="unlearn",method="{DEFAULT_METHOD}",state="succeeded"}}' in scraped
    # The worker's JSON log lines of the job carry the HTTP request id that queued it, with the job's ids.
    lines = [json.loads(line) for line in env.worker_log.read_text().splitlines() if line.startswith("{")]
    job_lines = [line for line in lines if line.get("job_id") == job["id"]]
    assert job_lines and all(line["request_id"] == first["http_request_id"] for line in job_lines)
    assert all(line["deletion_request_ids"] == [first["id"]] for line in job_lines)
    second = env.request(model, "subject-0002")
    job = env.wait_job(job_of(second), _done)
    assert job["state"] == "succeeded", job
    assert job["base_version_id"] == v2["id"]
    env.wait_completed(second)
    _, v2_after, v3 = env.versions(model)
    assert (v2_after["status"], v3["status"], v3["parent_id"]) == ("purged", "active", v2["id"])


def test_redelivered_message_for_a_finished_job_does_nothing(env: Env) -> None:
    model = env.register_model()
    request = env.request(model, "subject-0003")
    job = env.wait_job(job_of(request), _done)
    assert job["state"] == "succeeded"
    env.wait_completed(request)  # its purge has run too
    versions = env.versions(model)

    env.dispatcher.dispatch(job["id"])  # as Redis would after a visibility timeout
    deadline = time.monotonic() + TIMEOUT_S
    while any(job["id"] in ids for ids in message_job_ids(env.redis, "gpu")):
        assert time.monotonic() < deadline, "the worker never took the redelivered message"
        time.sleep(0.2)
    assert env.client.get(f"/jobs/{job['id']}").json() == job
    assert env.versions(model) == versions
    # The same code path, called directly: nothing to do.
    store = env.job_store(env.settings)
    assert run_job(job["id"], session_factory=env.session_factory, store=store, settings=env.settings,
                   worker_id="test", dispatcher=env.dispatcher) is None  # fmt: skip


def test_cancel_stops_a_running_job_and_registers_nothing(env: Env) -> None:
    model = env.register_model()
    request = env.request(model, "subject-0004", {"epochs": 10_000})
    env.wait_job(job_of(request), lambda job: (job["progress"] or {}).get("step", 0) > 0)

    answer = env.client.post(f"/jobs/{job_of(request)}/cancel")
    assert answer.status_code == 202 and answer.json()["cancel_requested"]
    job = env.wait_job(job_of(request), _done)
    assert job["state"] == "canceled" and job["error"]["reason"] == "canceled"
    assert [v["status"] for v in env.versions(model)] == ["active"]
    assert erased_sample_ids(env.client, env.dataset_id, request["id"]) == []
    assert env.client.get(f"/deletion-requests/{request['id']}").json()["state"] == "canceled"


def test_audit_gate_rejects_and_the_model_keeps_its_version(env: Env) -> None:
    # Not dispatched to the Celery worker: the job runs here, through the same pipeline, with a gate no model
    # can pass (the audit accuracy would have to rise by 100 points).
    strict = env.settings.model_copy(update={"gate_max_audit_drop": -100.0})
    recording = RecordingDispatcher()
    with TestClient(create_app(strict, recording, session_factory=env.session_factory)) as api:
        api.headers["Authorization"] = env.client.headers["Authorization"]
        model = env.register_model()
        answer = api.post(
            "/deletion-requests", json={"model": model, "subject_id": "subject-0005", "config": FAST}
        )
        request = answer.json()
        assert recording.dispatched == [job_of(request)]
        store = env.job_store(strict)
        state = run_job(job_of(request), session_factory=env.session_factory, store=store, settings=strict,
                        worker_id="test", dispatcher=recording)  # fmt: skip
    assert state == "rejected"
    job = env.client.get(f"/jobs/{job_of(request)}").json()
    assert job["state"] == "rejected" and job["error"]["reason"] == "audit_gate"
    assert not job["metrics"]["gate"]["passed"]
    initial, rejected = env.versions(model)
    assert (initial["status"], rejected["status"]) == ("active", "rejected")
    assert rejected["rejection_reason"] and rejected["parent_id"] == initial["id"]
    assert env.client.get(f"/models/{model}").json()["active_version"]["id"] == initial["id"]
    assert erased_sample_ids(env.client, env.dataset_id, request["id"]) == []
    assert env.client.get(f"/deletion-requests/{request['id']}").json()["state"] == "rejected"


def test_sweeper_redispatches_a_queued_job_whose_message_is_lost(env: Env) -> None:
    recording = RecordingDispatcher()  # the API "loses" the message: nothing reaches Redis
    with TestClient(create_app(env.settings, recording, session_factory=env.session_factory)) as api:
        api.headers["Authorization"] = env.client.headers["Authorization"]
        model = env.register_model()
        answer = api.post(
            "/deletion-requests", json={"model": model, "subject_id": "subject-0006", "config": FAST}
        )
        job_id = job_of(answer.json())
    eager = env.settings.model_copy(update={"sweep_min_age_s": 0})
    swept = sweep(env.session_factory, env.redis, env.dispatcher, eager)
    assert job_id in swept
    assert env.wait_job(job_id, _done)["state"] == "succeeded"


def test_two_workers_run_two_models_in_parallel_and_one_models_jobs_in_turn(env: Env) -> None:
    second, log = env.start_worker("w2", LETHE_WORKER_METRICS_PORT="0")
    # Warmed up like a worker in service: its first message imports torch, which takes seconds here.
    deadline = time.monotonic() + TIMEOUT_S
    env.dispatcher.dispatch("warm-up")  # no such job: taken by one of the workers, nothing done
    while "succeeded in" not in log.read_text():
        assert time.monotonic() < deadline and second.poll() is None, log.read_text()[-4000:]
        if "ready." in log.read_text() and not message_job_ids(env.redis, "gpu")[0]:
            env.dispatcher.dispatch("warm-up")  # the first worker took it
        time.sleep(0.5)
    try:
        models = [env.register_model(), env.register_model()]
        # Different seeds: requests that do not coalesce, so each model has two jobs to run in turn.
        requests = [env.request(model, f"subject-00{10 + 2 * i + j}", {"epochs": 50, "seed": j})
                    for i, model in enumerate(models) for j in range(2)]  # fmt: skip
        jobs = [env.wait_job(job_of(request), _done) for request in requests]
        for request in requests:
            env.wait_completed(request)
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert all(job["state"] == "succeeded" for job in jobs), [job["error"] for job in jobs]

    def interval(job: dict[str, Any]) -> tuple[datetime, datetime]:
        timings = job["timings"]
        return datetime.fromisoformat(timings["started_at"]), datetime.fromisoformat(timings["finished_at"])

    def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
        (start_a, end_a), (start_b, end_b) = interval(a), interval(b)
        return start_a < end_b and start_b < end_a

    by_model: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        by_model.setdefault(job["model_id"], []).append(job)
    assert all(not overlap(*pair) for pair in by_model.values())  # one model: one job at a time
    first, other = by_model.values()
    assert any(overlap(a, b) for a in first for b in other)  # two models: side by side
    workers = {job_row.worker_id for job_row in _job_rows(env, [job["id"] for job in jobs])}
    assert len({worker.split("@")[0] for worker in workers}) == 2, workers
    for model in by_model:
        lineage = [
            v["status"] for v in env.client.get(f"/models/{_name(env, model)}/versions").json()["items"]
        ]
        assert lineage == ["purged", "purged", "active"]  # each earlier version held an erased subject


def _job_rows(env: Env, job_ids: list[str]) -> list[Job]:
    with env.session_factory() as session:
        return [job for job_id in job_ids if (job := session.get(Job, job_id)) is not None]


def _name(env: Env, model_id: str) -> str:
    return next(m["name"] for m in env.client.get("/models", params={"limit": 500}).json()["items"]
                if m["id"] == model_id)  # fmt: skip
