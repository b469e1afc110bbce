"""The same erasure posted many times at once, over real HTTP against one uvicorn process on Postgres: with
one Idempotency-Key it is one request and one job; without a key it is many requests, but they share one job
and the subject's samples are unlearned once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.core.database import make_engine, make_session_factory, migrate
from service.core.settings import Settings
from service.deletion_requests.tables import DeletionRequest
from service.erasures import repository as erasures_repository
from service.erasures.tables import ErasureTarget
from service.jobs import service as jobs_service
from service.jobs.tables import Job
from service.models import repository as models_repository
from tests.faults.conftest import Cluster
from tests.service.conftest import (
    RecordingDispatcher,
    authorize,
    checkpoint_bytes,
    dataset_body,
    spec,
    write_array,
)
from worker.demo import LocalServer

CONCURRENT = 20
PER_SENDER = 30  # requests each of eight senders posts while a worker claims


@pytest.fixture
def api(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[httpx.Client, sessionmaker[Session]]]:
    migrate(cluster.url)
    settings = Settings(
        database_url=cluster.url,
        storage_url=str(tmp_path / "store"),
        data_dir=tmp_path,
        batch_wait_s=60,
        rate_limit="",  # twenty at once: this test is about idempotency, not rate limits
    )
    engine = make_engine(cluster.url, pool_size=CONCURRENT)
    factory = make_session_factory(engine)
    name = f"m-{tmp_path.name}"[-60:]
    try:
        app = create_app(settings, RecordingDispatcher(), session_factory=factory)
        with LocalServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            authorize(client, factory)
            dataset = client.post(
                "/datasets", json=dataset_body(write_array(tmp_path / "toy.npz", 10), name=name)
            ).json()
            (tmp_path / "m.safetensors").write_bytes(checkpoint_bytes())
            body = {
                "name": name,
                "dataset_id": dataset["id"],
                "spec": spec(),
                "checkpoint_path": "m.safetensors",
            }
            assert client.post("/models", json=body).status_code == 201
            client.headers["X-Model"] = name
            yield client, factory
    finally:
        engine.dispose()


def _post_at_once(client: httpx.Client, key: str | None) -> list[httpx.Response]:
    body = {"model": client.headers["X-Model"], "subject_id": "alice"}
    headers = {"Idempotency-Key": key} if key else {}
    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(
            pool.map(
                lambda _: client.post("/deletion-requests", json=body, headers=headers), range(CONCURRENT)
            )
        )


def _count(factory: sessionmaker[Session], table: Any, model_id: str) -> int:
    """Rows of ``table`` (requests, jobs) of the model: the cluster is shared by this module's tests."""
    with factory() as session:
        return int(session.scalar(select(func.count()).where(table.model_id == model_id)) or 0)


def test_one_key_posted_twenty_times_at_once_is_one_request_and_one_job(
    api: tuple[httpx.Client, sessionmaker[Session]],
) -> None:
    client, factory = api
    answers = _post_at_once(client, "erasure-ticket-1")
    assert {answer.status_code for answer in answers} == {202}, {a.status_code: a.text for a in answers}
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert sum(answer.headers.get("idempotent-replayed") == "true" for answer in answers) == CONCURRENT - 1
    model_id = client.get(f"/models/{client.headers['X-Model']}").json()["id"]
    assert _count(factory, DeletionRequest, model_id) == 1 and _count(factory, Job, model_id) == 1


def test_twenty_requests_for_one_subject_share_one_job_and_unlearn_its_samples_once(
    api: tuple[httpx.Client, sessionmaker[Session]],
) -> None:
    client, factory = api
    answers = _post_at_once(client, None)
    assert {answer.status_code for answer in answers} == {202}
    assert len({answer.json()["id"] for answer in answers}) == CONCURRENT  # each a request of its own
    assert len({answer.json()["erasures"][0]["job_id"] for answer in answers}) == 1  # one job for all
    job_id = answers[0].json()["erasures"][0]["job_id"]
    with factory.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.ready_at = None  # end the coalescing wait now
    with factory.begin() as session:
        claimed = jobs_service.claim_job(session, job_id, "w1", timedelta(minutes=1))
    assert isinstance(claimed, jobs_service.ClaimedJob)
    assert len(claimed.targets) == CONCURRENT
    assert claimed.forget_sample_ids == ("s0", "s1", "s2")  # alice's train samples, each once


def test_a_request_whose_open_job_is_claimed_before_it_commits_joins_the_next_job(
    api: tuple[httpx.Client, sessionmaker[Session]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request joins its model's open job as read without the job's lock; a worker that claims the job
    before the request commits leaves it nothing to join: the commit writes nothing, and the request is made
    again under the lock, into a new job. The claimed job keeps exactly what it held."""
    client, factory = api
    body = {"model": client.headers["X-Model"], "subject_id": "alice"}
    first = client.post("/deletion-requests", json=body).json()["erasures"][0]["job_id"]
    read = erasures_repository.open_batches

    def claimed_after_the_read(session: Session, model_id: str, method: str, *, lock: bool = True) -> Any:
        jobs = read(session, model_id, method, lock=lock)
        if not lock:  # a worker takes the job between this read and the request's commit
            with factory.begin() as worker:
                worker.execute(update(Job).where(Job.id == first).values(state="running", batch_open=False))
        return jobs

    monkeypatch.setattr(erasures_repository, "open_batches", claimed_after_the_read)
    answer = client.post("/deletion-requests", json=body, headers={"Idempotency-Key": "late"})
    assert answer.status_code == 202, answer.text
    second = answer.json()["erasures"][0]["job_id"]
    assert second != first
    jobs = {job_id: client.get(f"/jobs/{job_id}").json() for job_id in (first, second)}
    assert [len(jobs[first]["request_ids"]), jobs[first]["sample_count"]] == [1, 3]
    assert jobs[second]["request_ids"] == [answer.json()["id"]] and jobs[second]["sample_count"] == 3
    replayed = client.post("/deletion-requests", json=body, headers={"Idempotency-Key": "late"})
    assert replayed.headers.get("idempotent-replayed") == "true" and replayed.json() == answer.json()
    assert client.get("/audit-trail/verification").json()["valid"] is True


def test_requests_streaming_while_a_worker_claims_land_each_in_one_job_counted_once(
    api: tuple[httpx.Client, sessionmaker[Session]],
) -> None:
    """Eight clients post while a worker keeps claiming the model's jobs: every request lands in exactly one
    job, no job takes a request after its claim, and each job's sample count is its requests' samples (the
    optimistic join's relative update neither loses nor doubles one)."""
    client, factory = api
    model_id = client.get(f"/models/{client.headers['X-Model']}").json()["id"]
    claimed: dict[str, set[str]] = {}  # job -> the targets it was claimed with
    posting = threading.Event()
    posting.set()

    def worker() -> None:
        while posting.is_set():
            with factory.begin() as session:  # its coalescing wait over at once
                session.execute(
                    update(Job).where(Job.model_id == model_id, Job.state == "queued").values(ready_at=None)
                )
            with factory.begin() as session:
                job_id = session.scalar(
                    select(Job.id).where(Job.model_id == model_id, Job.state == "queued").limit(1)
                )
                got = jobs_service.claim_job(session, job_id, "w1", timedelta(minutes=1)) if job_id else None
            if isinstance(got, jobs_service.ClaimedJob):
                claimed[got.job_id] = {target.target_id for target in got.targets}
                with factory.begin() as session:  # ended without settling: where requests landed is the point
                    session.execute(update(Job).where(Job.id == got.job_id).values(state="failed"))
            time.sleep(0.02)

    def post(sender: int) -> list[int]:
        body = {"model": client.headers["X-Model"]}
        return [
            client.post(
                "/deletion-requests", json={**body, "sample_ids": [f"s{(sender + i) % 8}"]}
            ).status_code
            for i in range(PER_SENDER)
        ]

    claims = threading.Thread(target=worker)
    claims.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = [status for answers in pool.map(post, range(8)) for status in answers]
    finally:
        posting.clear()
        claims.join()
    assert statuses == [202] * 8 * PER_SENDER
    with factory() as session:
        targets = session.execute(
            select(ErasureTarget.id, ErasureTarget.job_id, ErasureTarget.pending_count)
            .where(ErasureTarget.model_id == model_id)
        ).all()  # fmt: skip
        counts = dict(session.execute(select(Job.id, Job.sample_count).where(Job.model_id == model_id)).all())
    assert len(targets) == 8 * PER_SENDER and all(target.job_id is not None for target in targets)
    held: dict[str, set[str]] = {}
    for target in targets:
        held.setdefault(target.job_id, set()).add(target.id)
    assert {job_id: sum(t.pending_count for t in targets if t.job_id == job_id) for job_id in held} == {
        job_id: counts[job_id] for job_id in held
    }
    assert len(claimed) >= 2, claimed  # the worker did claim jobs while requests streamed in
    assert all(held.get(job_id, set()) == claimed_with for job_id, claimed_with in claimed.items())


def test_a_request_of_another_configuration_never_holds_a_job_a_claim_waits_for(
    api: tuple[httpx.Client, sessionmaker[Session]],
) -> None:
    """Found by the end-to-end test under load as a deadlock: a request whose configuration has no open job
    locked the model's open jobs of other configurations, then waited for the model's lock, which a claim
    held while it waited for one of those jobs. Now it locks only jobs it may join, so the claim goes on."""
    client, factory = api
    body = {"model": client.headers["X-Model"], "subject_id": "alice"}
    open_job = client.post("/deletion-requests", json=body).json()["erasures"][0]["job_id"]
    model_id = client.get(f"/models/{client.headers['X-Model']}").json()["id"]
    with factory.begin() as claim:  # the claim's order: the model's lock, then its job's
        models_repository.lock_model(claim, model_id)
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(client.post, "/deletion-requests", json={**body, "config": {"min_steps": 7}})
            time.sleep(1.0)  # the request is now waiting for the model's lock
            assert not other.done()
            claim.execute(select(Job.id).where(Job.id == open_job).with_for_update()).one()
            claim.commit()  # before the fix, Postgres broke the cycle by failing one side
            answer = other.result(timeout=30)
    assert answer.status_code == 202, answer.text
    assert answer.json()["erasures"][0]["job_id"] != open_job
