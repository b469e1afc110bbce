"""A deletion request accepted with 202 completes exactly once through worker, queue and database faults.

Everything is real and of this module's own: its Postgres cluster and Redis server (tests/faults/conftest.py),
the API under uvicorn (over HTTP), Celery worker processes started as in production (``lethe worker``) with
their settings in LETHE_* variables. Leases and sweeps are short here (a lease of 4 s, a sweep every 2 s) so
that what the defaults do in minutes takes seconds. Each test ends by counting rows: requests, jobs, versions
and erased samples, so "completed" also means "once".

The digits dataset (8x8, 10 samples per data subject here), the end-to-end tests' small CNN and their lenient
audit gate (tests/service/test_end_to_end.py) keep each job to about a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.core.database import make_engine, make_session_factory, migrate
from service.core.settings import Settings
from service.deletion_requests.tables import DeletionRequest
from service.dispatch import GPU_QUEUE, CeleryDispatcher
from service.erasures.tables import ErasedSample
from service.jobs.tables import Job
from service.models.tables import ModelVersion
from service.trail.tables import TrailEvent
from tests.faults.conftest import Cluster, RedisServer
from tests.service.conftest import issue_token, job_of
from tests.service.test_end_to_end import FAST, SPEC, start_worker
from worker.datasets.builtin import load_dataset
from worker.demo import LocalServer, dataset_body, erased_sample_ids, train_initial_checkpoint, write_dataset
from worker.engine.config import TrainingConfig
from worker.tasks import message_job_ids

pytestmark = pytest.mark.slow

LEASE_S = 4  # job_lease_s
SWEEP_S = 2  # sweep_interval_s
MIN_AGE_S = 1  # sweep_min_age_s
PROGRESS_S = 0.2  # progress_interval_s: the heartbeat that renews the lease
PER_SUBJECT = 10  # train samples per data subject
SUBJECTS = 125  # subject-0000 .. subject-0124 hold PER_SUBJECT of digits' 1258 train samples each
TIMEOUT_S = 120  # any wait on a job or a worker (normally seconds)
REQUEST_BOUND_S = 5.0  # the longest an HTTP request may take, outage or not
# A job that unlearns for a few seconds: the default method (repair) over the remaining digits, about 40
# steps an epoch, ~5 ms a step here.
LONG = {"epochs": 15}

T = TypeVar("T")


@dataclass
class Stack:
    settings: Settings  # what the API runs with; the workers get the same through worker_env
    factory: sessionmaker[Session]
    redis: redis.Redis
    token: str
    dataset_id: str
    checkpoint_path: Path
    worker_env: dict[str, str]


@pytest.fixture(scope="module")
def stack(
    cluster: Cluster, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("worker-faults")
    migrate(cluster.url)
    settings = Settings(
        database_url=cluster.url, redis_url=redis_server.url, storage_url=str(directory / "store"),
        cache_dir=directory / "cache", data_dir=directory, dispatcher="celery", audit_references=4,
        audit_level=1e-12, gate_max_audit_drop=100.0, gate_max_class_drop=100.0, batch_wait_s=0,
        rate_limit="", job_lease_s=LEASE_S, sweep_interval_s=SWEEP_S, sweep_min_age_s=MIN_AGE_S,
        progress_interval_s=PROGRESS_S,
    )  # fmt: skip
    worker_env = {
        **os.environ,
        "LETHE_DATABASE_URL": cluster.url,
        "LETHE_REDIS_URL": redis_server.url,
        "LETHE_STORAGE_URL": settings.storage_url,
        "LETHE_CACHE_DIR": str(settings.cache_dir),
        "LETHE_WORKER_METRICS_PORT": "0",  # several workers at once: no metrics port to share
        "LETHE_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "LETHE_AUDIT_REFERENCES": "4",
        "LETHE_AUDIT_LEVEL": "1e-12",
        "LETHE_GATE_MAX_AUDIT_DROP": "100",
        "LETHE_GATE_MAX_CLASS_DROP": "100",
        "LETHE_BATCH_WAIT_S": "0",
        "LETHE_JOB_LEASE_S": str(LEASE_S),
        "LETHE_SWEEP_INTERVAL_S": str(SWEEP_S),
        "LETHE_SWEEP_MIN_AGE_S": str(MIN_AGE_S),
        "LETHE_PROGRESS_INTERVAL_S": str(PROGRESS_S),
    }
    dataset = load_dataset("digits")
    array_path = directory / "digits.npz"
    write_dataset(dataset, array_path)
    checkpoint_path = directory / "initial.safetensors"
    checkpoint_path.write_bytes(train_initial_checkpoint(dataset, SPEC, TrainingConfig(epochs=5)))
    engine = make_engine(cluster.url)
    factory = make_session_factory(engine)
    queue = redis_server.client()
    try:
        partial = Stack(settings, factory, queue, issue_token(factory), "", checkpoint_path, worker_env)
        with serve(partial) as api:
            answer = api.post("/datasets", json=dataset_body(dataset, array_path, PER_SUBJECT))
            assert answer.status_code == 201, answer.text
        partial.dataset_id = answer.json()["id"]
        yield partial
    finally:
        queue.close()
        engine.dispose()


@contextlib.contextmanager
def serve(stack: Stack, **overrides: Any) -> Iterator[httpx.Client]:
    """The API (dispatching to the fault Redis) under uvicorn, and an authorised client of it."""
    settings = stack.settings.model_copy(update=overrides)
    app = create_app(settings, CeleryDispatcher(settings.redis_url), session_factory=stack.factory)
    headers = {"Authorization": f"Bearer {stack.token}"}
    with (
        LocalServer(app) as server,
        httpx.Client(base_url=server.url, headers=headers, timeout=REQUEST_BOUND_S * 2) as client,
    ):
        yield client


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Workers:
    """The worker processes a test starts; all stopped at its end (SIGTERM, then SIGKILL)."""

    stack: Stack
    directory: Path
    started: list[Worker] = field(default_factory=list)

    def start(self, name: str) -> Worker:
        log = self.directory / f"{name}.log"
        worker = Worker(name, start_worker(self.stack.worker_env, log, name), log)
        self.started.append(worker)
        return worker

    def logs(self) -> str:
        """Every worker's log tail, for assertion messages."""
        return "".join(
            f"\n--- worker {w.name} (exit {w.process.poll()}):\n{w.text()[-3000:]}" for w in self.started
        )

    def warm_up(self, *workers: Worker) -> None:
        """Until each of ``workers`` has run a task (a message naming no job: nothing to do), so torch is
        imported before the test times anything."""
        dispatcher = CeleryDispatcher(self.stack.settings.redis_url)
        dispatcher.dispatch("warm-up")
        deadline = time.monotonic() + TIMEOUT_S
        while not all("succeeded in" in w.text() for w in workers):
            assert time.monotonic() < deadline, f"workers never warmed up{self.logs()}"
            if not message_job_ids(self.stack.redis, GPU_QUEUE)[0]:  # taken: another, for the others
                dispatcher.dispatch("warm-up")
            time.sleep(0.3)

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.started:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(stack, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def wait_until(condition: Callable[[], T], what: str, workers: Workers, timeout: float = TIMEOUT_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s{workers.logs()}")
        time.sleep(0.1)


def register_model(api: httpx.Client, stack: Stack, name: str) -> dict[str, Any]:
    """A model of the initial weights in checkpoint bytes of its own (its name in the file's metadata): once a
    model's first version is purged, its bytes are refused at registration, and must not be another's."""
    own = stack.checkpoint_path.with_name(f"{name}.safetensors")
    initial = load_safetensors(stack.checkpoint_path.read_bytes())
    own.write_bytes(save_safetensors(initial, metadata={"test_model": name}))
    body = {"name": name, "dataset_id": stack.dataset_id, "spec": SPEC.to_dict(),
            "checkpoint_path": str(own), "training_recipe": {"epochs": 2}}  # fmt: skip
    answer = api.post("/models", json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def request(api: httpx.Client, model: str, subject: str, config: dict[str, Any] = FAST) -> dict[str, Any]:
    answer = api.post("/deletion-requests", json={"model": model, "subject_id": subject, "config": config})
    assert answer.status_code == 202, answer.text
    assert answer.json()["sample_count"] == PER_SUBJECT
    return dict(answer.json())


def job_row(stack: Stack, job_id: str) -> Job:
    with stack.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def rows(stack: Stack, table: Any, model_id: str) -> list[Any]:
    """The model's rows of ``table``, oldest first (the cluster is shared by this module's tests)."""
    order = {
        ModelVersion: ModelVersion.number,
        Job: Job.created_at,
        DeletionRequest: DeletionRequest.received_at,
        ErasedSample: ErasedSample.sample_pk,
    }[table]
    with stack.factory() as session:
        return list(session.scalars(select(table).where(table.model_id == model_id).order_by(order)))


def events(stack: Stack, job_id: str) -> dict[str, int]:
    """How many times each kind of trail event was recorded for the job."""
    with stack.factory() as session:
        counted = session.execute(
            select(TrailEvent.kind, func.count())
            .where(TrailEvent.subject_type == "job", TrailEvent.subject_id == job_id)
            .group_by(TrailEvent.kind)
        )
        return {kind: count for kind, count in counted}


def done(stack: Stack, job_ids: list[str]) -> bool:
    return all(job_row(stack, job_id).finished_at is not None for job_id in job_ids)


def assert_completed_once(stack: Stack, model_id: str, request_ids: list[str], jobs: int, logs: str) -> None:
    """The model's requests are exactly ``request_ids``, all completed, by ``jobs`` succeeded jobs that each
    registered one version in one lineage (each version's parent the one before, the last one active), and
    each request's samples are erased from the model once, by the version of its job. A request completes
    once its purge has run (the worker that ran its job runs it next): it is waited for."""
    deadline = time.monotonic() + 60
    while any(r.state == "processing" for r in rows(stack, DeletionRequest, model_id)):
        assert time.monotonic() < deadline, logs
        time.sleep(0.2)
    requests = rows(stack, DeletionRequest, model_id)
    assert sorted(r.id for r in requests) == sorted(request_ids), logs
    assert all(r.state == "completed" for r in requests), [(r.id, r.state) for r in requests]
    every_job = rows(stack, Job, model_id)
    assert all(j.state == "succeeded" for j in every_job if j.kind == "purge"), logs
    job_rows = [j for j in every_job if j.kind == "unlearn"]
    assert [j.state for j in job_rows] == ["succeeded"] * jobs, [(j.state, j.error_detail) for j in job_rows]
    versions = rows(stack, ModelVersion, model_id)
    assert [v.number for v in versions] == list(range(1, jobs + 2))
    # Every earlier version held a subject erased since: purged, its row a tombstone.
    assert [v.status for v in versions] == ["purged"] * jobs + ["active"]
    assert [v.parent_id for v in versions] == [None, *(v.id for v in versions[:-1])]
    by_job = {v.created_by_job_id: v for v in versions[1:]}
    assert len(by_job) == jobs and all(by_job[j.id].id == j.result_version_id for j in job_rows)
    assert all(j.base_version_id == by_job[j.id].parent_id for j in job_rows)
    for job in job_rows:
        counted = events(stack, job.id)
        assert counted.get("job.succeeded") == 1 and counted.get("job.running") == 1, counted
    # (A model registered after other tests' purges holds none of their subjects: those are recorded as
    # erased since its first version, by no request.)
    erased = [e for e in rows(stack, ErasedSample, model_id) if e.request_id is not None]
    assert len(erased) == sum(r.sample_count for r in requests) == PER_SUBJECT * len(request_ids)
    for r in requests:
        own = [e for e in erased if e.request_id == r.id]
        job_id = next(j.id for j in job_rows if r.id in (j.metrics or {}).get("audits", {}))
        assert len(own) == r.sample_count and {e.version_id for e in own} == {by_job[job_id].id}


def test_a_worker_killed_mid_unlearning_is_replaced_and_its_job_completes_once(
    stack: Stack, workers: Workers
) -> None:
    """SIGKILL of the worker running a job: another worker process takes the job over and finishes it, once.

    Nothing tells the queue: the message stays reserved by the dead worker (Redis would redeliver it only
    after job_visibility_timeout_s, 6 h). The heartbeat last renewed the lease (for job_lease_s) at most
    progress_interval_s before the kill, so it lapses at most job_lease_s after it. The live worker's sweeper
    runs every sweep_interval_s (its Redis lock lasts sweep_interval_s - 1 s, so one the dead worker took is
    gone by then; sweep_min_age_s applies only to queued jobs), finds the running job with a lapsed lease and
    no message waiting, and re-dispatches it; an idle worker claims it at once ("job.taken_over"). Bound from
    the kill to the take-over: job_lease_s + sweep_interval_s = 4 + 2 = 6 s here (asserted, with 2 s for the
    claim and this test's polling); with the defaults (job_lease_s=120, sweep_interval_s=60): 120 + 60 =
    180 s. Then the job reruns from its last committed step: killed while unlearning, it unlearns again
    from the same base version; killed while evaluating, it only audits the stored checkpoint again.
    """
    with serve(stack) as api:
        model = register_model(api, stack, "digits-killed")
        pair = workers.start("w-a"), workers.start("w-b")
        workers.warm_up(*pair)
        posted = request(api, model["name"], "subject-0001", LONG)
        job_id = job_of(posted)

        def unlearning() -> dict[str, Any]:  # the job once its unlearning has taken a step, else {}
            job: dict[str, Any] = api.get(f"/jobs/{job_id}").json()
            progress = job["progress"] or {}
            moving = job["state"] == "running" and progress.get("phase") == "unlearning"
            return job if moving and progress["step"] > 0 else {}

        running = wait_until(unlearning, "unlearning", workers)
        holder = job_row(stack, job_id).worker_id or ""
        [victim] = [w for w in pair if holder.startswith(f"{w.name}@")]
        [spare] = [w for w in pair if w is not victim]
        assert running["progress"]["step"] < running["progress"]["total_steps"]
        os.kill(victim.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert victim.process.wait(timeout=10) == -signal.SIGKILL

        taken = wait_until(
            lambda: (job_row(stack, job_id).worker_id or "").startswith(f"{spare.name}@"),
            "taken over by the spare worker", workers,
        )  # fmt: skip
        taken_after = time.monotonic() - killed_at
        assert taken and taken_after <= LEASE_S + SWEEP_S + 2.0, (taken_after, workers.logs())
        print(
            f"\nkilled at step {running['progress']['step']}; taken over {taken_after:.1f} s after the kill"
        )
        wait_until(lambda: done(stack, [job_id]), "done", workers)

        job = api.get(f"/jobs/{job_id}").json()
        assert job["state"] == "succeeded", (job, workers.logs())
        counted = events(stack, job_id)
        assert (counted["job.running"], counted["job.taken_over"], counted["job.succeeded"]) == (1, 1, 1)
        assert f"sweeper: job {job_id} has no message" in spare.text()
        assert_completed_once(stack, model["id"], [posted["id"]], jobs=1, logs=workers.logs())
        erased = erased_sample_ids(api, stack.dataset_id, posted["id"])
        assert len(erased) == len(set(erased)) == PER_SUBJECT
        assert api.get(f"/deletion-requests/{posted['id']}").json()["state"] == "completed"


def test_jobs_queued_when_redis_is_flushed_are_all_run_once_a_worker_starts(
    stack: Stack, workers: Workers
) -> None:
    """FLUSHALL with three jobs queued (two models; one job per request) and no worker: the messages are gone,
    Postgres still has the jobs; the sweeper of the worker that starts re-dispatches each, and each runs."""
    with serve(stack, batch_max_samples=1) as api:
        models = [register_model(api, stack, name) for name in ("digits-flush-a", "digits-flush-b")]
        # Subjects no other test erased: once every model has erased one, its rows are purged and a model
        # registered later holds none of it.
        posted = [request(api, models[0]["name"], f"subject-000{i}") for i in (2, 3)]
        posted.append(request(api, models[1]["name"], "subject-0002"))
        job_ids = [job_of(r) for r in posted]
        assert len(set(job_ids)) == 3 and {job_row(stack, j).state for j in job_ids} == {"queued"}
        assert set(job_ids) <= message_job_ids(stack.redis, GPU_QUEUE)[0]

        stack.redis.flushall()
        assert message_job_ids(stack.redis, GPU_QUEUE) == (set(), set())
        worker = workers.start("w-flush")
        wait_until(lambda: done(stack, job_ids), "all done", workers)

        for job_id in job_ids:
            assert f"sweeper: job {job_id} has no message" in worker.text()
        assert_completed_once(
            stack, models[0]["id"], [r["id"] for r in posted[:2]], jobs=2, logs=workers.logs()
        )
        assert_completed_once(stack, models[1]["id"], [posted[2]["id"]], jobs=1, logs=workers.logs())
        for r in posted:
            assert api.get(f"/deletion-requests/{r['id']}").json()["state"] == "completed"


@dataclass
class Posted:
    subject: str
    seconds: float
    status: int | None = None  # None: no answer (timeout, connection error)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    error: str | None = None


class Poster(threading.Thread):
    """POSTs one request after another (a new subject each, FAST), each bounded in time, until told to stop
    or out of subjects; a 503 is followed by a longer pause, as a client honouring Retry-After would (here,
    briefly)."""

    def __init__(self, url: str, token: str, model: str, first_subject: int) -> None:
        super().__init__(name="poster", daemon=True)
        self.url, self.token, self.model, self.next = url, token, model, first_subject
        self.results: list[Posted] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = httpx.Timeout(REQUEST_BOUND_S * 2)
        with httpx.Client(base_url=self.url, headers=headers, timeout=timeout) as client:
            while not self.stopping.is_set() and self.next < SUBJECTS:
                subject = f"subject-{self.next:04d}"
                self.next += 1
                body = {"model": self.model, "subject_id": subject, "config": FAST}
                started = time.monotonic()
                try:
                    answer = client.post("/deletion-requests", json=body)
                except httpx.HTTPError as exc:
                    self.results.append(Posted(subject, time.monotonic() - started, error=repr(exc)))
                    time.sleep(0.25)
                    continue
                self.results.append(
                    Posted(subject, time.monotonic() - started, answer.status_code, dict(answer.headers),
                           answer.json() if answer.content else None)
                )  # fmt: skip
                time.sleep(0.1 if answer.is_success else 0.25)

    def count(self, status: int) -> int:
        return sum(result.status == status for result in self.results)


def test_a_postgres_restart_under_load_loses_no_accepted_request_and_the_running_job_completes(
    cluster: Cluster, stack: Stack, workers: Workers
) -> None:
    """Postgres stops while a job unlearns and a client keeps posting over HTTP, and stays down until the job
    meets the outage at its next commit; then it starts again.

    Each POST is answered within REQUEST_BOUND_S, with a 202 or (during the outage) a 503 problem with
    Retry-After, never a 500; nothing of a 503 is recorded; every 202 is a request in the database and
    completes. The job's heartbeats fail, its commit fails, its task ends, and the job stays running with a
    lease that lapses: the sweeper re-dispatches it and it is taken over, once, and completes, once. The
    requests posted meanwhile coalesce into the model's next jobs, whose messages the worker may have burnt
    during the outage (the sweeper re-sends queued jobs that have none)."""
    with serve(stack) as api:
        model = register_model(api, stack, "digits-restart")
        worker = workers.start("w-restart")
        first = request(api, model["name"], "subject-0004", LONG)
        running = job_of(first)
        wait_until(
            lambda: (api.get(f"/jobs/{running}").json()["progress"] or {}).get("phase") == "unlearning",
            "unlearning", workers,
        )  # fmt: skip
        poster = Poster(str(api.base_url), stack.token, model["name"], first_subject=10)
        poster.start()
        try:
            wait_until(lambda: poster.count(202) >= 3, "three requests accepted", workers)
            assert job_row(stack, running).state == "running"  # the outage starts under a running job
            cluster.stop()
            wait_until(
                lambda: f"Task lethe.run_job[{running}] retry: Retry in" in worker.text(),
                "the running job meeting the outage at a commit", workers, timeout=60,
            )  # fmt: skip
            wait_until(lambda: poster.count(503) >= 3, "three requests refused", workers, timeout=30)
            accepted_before = poster.count(202)
            cluster.start()
            wait_until(
                lambda: poster.count(202) >= accepted_before + 3, "accepting again", workers, timeout=30
            )
        finally:
            poster.stopping.set()
            poster.join(timeout=REQUEST_BOUND_S * 3)
        assert not poster.is_alive()

        results = poster.results
        assert all(r.error is None for r in results), [r.error for r in results if r.error]
        assert {r.status for r in results} == {202, 503}, [(r.status, r.body) for r in results]
        slowest = max(r.seconds for r in results)
        assert slowest < REQUEST_BOUND_S, slowest
        for refused in (r for r in results if r.status == 503):
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.body["type"] == "/problems/database-unavailable", refused.body
            assert int(refused.headers["retry-after"]) == stack.settings.retry_after_seconds
        accepted = [r for r in results if r.status == 202]
        with stack.factory() as session:
            # By id: a purged request keeps its subject only as a keyed hash.
            recorded = session.scalars(
                select(DeletionRequest.id).where(DeletionRequest.model_id == model["id"])
            ).all()
        assert sorted(recorded) == sorted([first["id"], *(r.body["id"] for r in accepted)])  # no 503

        request_ids = [first["id"], *(r.body["id"] for r in accepted)]
        job_ids = sorted({running, *(job_of(r.body) for r in accepted)})
        wait_until(lambda: done(stack, job_ids), "all done", workers)
        # The first job, and those the requests posted meanwhile joined (their purge jobs aside).
        jobs = [job for job in rows(stack, Job, model["id"]) if job.kind == "unlearn"]
        assert sorted(j.id for j in jobs) == job_ids
        assert_completed_once(stack, model["id"], request_ids, jobs=len(job_ids), logs=workers.logs())
        assert events(stack, running).get("job.taken_over") == 1, workers.logs()
        assert f"sweeper: job {running} has no message" in worker.text()
        for r in accepted:
            assert api.get(f"/deletion-requests/{r.body['id']}").json()["state"] == "completed"
        print(
            f"\n{len(accepted)} accepted, {poster.count(503)} refused during the outage (slowest answer "
            f"{slowest:.2f} s), {len(job_ids)} jobs"
        )


def test_two_requests_queued_together_on_one_model_are_two_versions_in_one_lineage(
    stack: Stack, workers: Workers
) -> None:
    """batch_max_samples=1: two requests queued together on one model are two jobs, not one coalesced; run
    one after another, each from the version the previous produced: v1 -> v2 -> v3, v3 active."""
    with serve(stack, batch_max_samples=1) as api:
        model = register_model(api, stack, "digits-lineage")
        first, second = (request(api, model["name"], subject) for subject in ("subject-0005", "subject-0006"))
        jobs = [job_of(first), job_of(second)]
        assert jobs[0] != jobs[1] and {job_row(stack, j).state for j in jobs} == {"queued"}
        workers.start("w-lineage")
        wait_until(lambda: done(stack, jobs), "both done", workers)

        assert_completed_once(stack, model["id"], [first["id"], second["id"]], jobs=2, logs=workers.logs())
        v1, v2, v3 = api.get(f"/models/{model['name']}/versions").json()["items"]
        assert (v1["status"], v2["status"], v3["status"]) == ("purged", "purged", "active")
        assert (v1["parent_id"], v2["parent_id"], v3["parent_id"]) == (None, v1["id"], v2["id"])
        assert api.get(f"/models/{model['name']}").json()["active_version"]["id"] == v3["id"]
        assert v2["covered_request_ids"] == [first["id"]] and v3["covered_request_ids"] == [second["id"]]
        one, two = api.get(f"/jobs/{jobs[0]}").json(), api.get(f"/jobs/{jobs[1]}").json()
        assert (one["base_version_id"], one["result_version_id"]) == (v1["id"], v2["id"])
        assert (two["base_version_id"], two["result_version_id"]) == (v2["id"], v3["id"])
        erased = [erased_sample_ids(api, stack.dataset_id, r["id"]) for r in (first, second)]
        assert [len(e) for e in erased] == [PER_SUBJECT, PER_SUBJECT] and not set(erased[0]) & set(erased[1])
