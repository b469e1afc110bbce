"""Erasure per model: a request's targets (one per model it applies to), coalescing them into jobs, and
settling them one by one; a request settles when its last target does. Never commits.

Coalescing: a new target joins its model's open job of the same method and configuration (one that is still
queued) unless that would take it past ``batch_max_samples``; otherwise it opens a new job, ready after
``batch_wait_s``. A job that fills up is ready at once. Workers take ready jobs earliest due date first
(``jobs.service.claim_job``), never two of one model at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.core.clock import utcnow
from service.core.database import Base, new_id, require_at_commit, write_at_commit, write_together
from service.core.settings import Settings
from service.datasets import repository as datasets_repository
from service.deletion_requests import repository as requests_repository
from service.deletion_requests.tables import DeletionRequest
from service.erasures import repository
from service.erasures.tables import ALREADY_ERASED, ErasureTarget
from service.jobs import repository as jobs_repository
from service.jobs.tables import Job
from service.models import repository as models_repository
from service.models.tables import Model
from service.purges import service as purges
from service.reports.generation import generate_many as generate_reports
from service.trail import service as trail
from service.webhooks import service as webhooks

# A request's final state when not every model completed: the first of these any of its targets ended in.
_UNFULFILLED = ("rejected", "failed", "canceled")


@dataclass(frozen=True)
class Dispatch:
    """A job to hand to the workers once the transaction commits, after ``delay_s`` seconds."""

    job_id: str
    delay_s: float = 0.0


def open_targets_many(
    session: Session,
    settings: Settings,
    batch: Sequence[tuple[DeletionRequest, Sequence[Model], Sequence[int], set[int] | None]],
    actor: str = "api",
    *,
    written_with: Sequence[tuple[type[Base], Sequence[Base | dict[str, Any]]]] = (),
    optimistic: bool = False,
) -> tuple[list[list[ErasureTarget]], list[Dispatch]]:
    """One target per model for each new request's samples (each with its models and sample pks), each
    queued into its model's open job, or completed at once when the model holds none of them; a request
    is settled when nothing of it is left pending. The erased samples are read once per model, and the
    coalescing done on the jobs in hand, each model's open jobs read (and locked) once; the targets, the
    new jobs and the counts of the jobs they joined are written in one statement (on Postgres) with
    ``written_with``, the new rows they refer to (their requests). The caller holds every model's lock, or
    is one request on one model, which joins an open job under that job's row lock alone (``_open_jobs``).
    Returns each request's targets (one per model, in order) and the jobs to dispatch.

    ``optimistic`` (one request on one model, the API's hot path): an open job with room is joined as read
    without its lock, by a guarded update run when the session commits (``core.database.require_at_commit``),
    and every row is written by that commit: the job's row is locked only from then to the commit, not
    while the caller builds its answer. If the job was claimed, sealed or filled meanwhile, the commit
    raises ``PreconditionFailed`` having written nothing, and the caller does it again without
    ``optimistic``. Where the request completes at once, or no job is open, it goes as without."""
    now = utcnow()
    erased: dict[str, set[int]] = {}
    for model_id in sorted({model.id for _request, models, _pks, _known in batch for model in models}):
        of_model = [item for item in batch if model_id in {model.id for model in item[1]}]
        known = [item[3] for item in of_model if len(item[1]) == 1]
        if len(known) == len(of_model) and all(found is not None for found in known):
            erased[model_id] = set().union(*(found or () for found in known))  # read with the samples
        else:
            wanted = sorted({pk for item in of_model for pk in item[2]})
            erased[model_id] = repository.erased_pks(session, model_id, wanted)
    wait = settings.batch_wait_s
    # Per (model, method, configuration): its open jobs oldest first, as a request one at a time finds them.
    open_jobs: dict[tuple[str, str, str], list[Job]] = {}
    dispatches: list[Dispatch] = []
    opened: list[list[ErasureTarget]] = []
    new_jobs: list[Job] = []
    joined: dict[str, Job] = {}  # the jobs read here whose count, due date or seal changed
    unlocked: dict[str, int] = {}  # the job joined as read without its lock (optimistic): samples added
    for request, models, pks, _known in batch:
        targets = []
        for model in models:
            held = len(erased[model.id].intersection(pks))
            target = ErasureTarget(
                id=new_id(), request_id=request.id, model_id=model.id, state="pending",
                pending_count=len(pks) - held, already_erased_count=held, attempts=[], due_at=request.due_at,
            )  # fmt: skip
            targets.append(target)
            if target.pending_count == 0:
                continue  # completed once written (below)
            key = (model.id, request.method, json.dumps(request.config, sort_keys=True))
            if key not in open_jobs:
                room_for = target.pending_count if optimistic else None
                open_jobs[key], locked = _open_jobs(
                    session, model.id, request.method, request.config, room_for, settings.batch_max_samples
                )
                if not locked:
                    unlocked[open_jobs[key][0].id] = target.pending_count
            jobs = open_jobs[key]
            job = jobs[0] if jobs else None
            if job is not None and job.sample_count + target.pending_count > settings.batch_max_samples:
                full = jobs.pop(0)
                dispatches.append(_seal(full, now))
                joined[full.id] = full
                job = None
            if job is None:
                job = _new_job(target, request.method, request.config, open_for=wait)
                new_jobs.append(job)
                jobs.append(job)  # the newest: a later request takes an older open job first
                dispatches.append(Dispatch(job.id, wait))
            _attach(session, job, target, actor, flush=False)
            joined[job.id] = job
            if job.sample_count >= settings.batch_max_samples:
                jobs.remove(job)
                dispatches.append(_seal(job, now))
        opened.append(targets)
    created = {job.id for job in new_jobs}
    updates = [_job_update(job, now) for job in joined.values() if job.id not in created]
    targets = [target for of_request in opened for target in of_request]
    inserts: list[tuple[type[Base], Sequence[Base | dict[str, Any]]]] = [
        *written_with,
        (Job, new_jobs),
        (ErasureTarget, targets),
    ]
    if unlocked:  # one request on one model (optimistic), its one target pending: written at the commit
        for job_id, samples in unlocked.items():
            due = min(target.due_at for target in targets if target.job_id == job_id)
            parameters = {"job_id": job_id, "samples": samples, "due_at": due,
                          "limit": settings.batch_max_samples, "now": now}  # fmt: skip
            require_at_commit(
                session,
                repository.JOIN_OPEN_JOB,
                parameters,
                f"job {job_id} no longer takes {samples} samples",
            )
        write_at_commit(session, inserts, [(Job, [row for row in updates if row["id"] not in unlocked])])
    else:
        write_together(session, inserts, [(Job, updates)])
    for (request, *_rest), targets in zip(batch, opened, strict=True):
        for target in targets:
            if target.pending_count == 0:
                _settle(session, target, "completed", now, actor, verdict=ALREADY_ERASED)
        if all(target.state != "pending" for target in targets):  # every model completed at once
            settle_request_if_done(session, request, now, actor)
    return opened, dispatches


def _open_jobs(
    session: Session, model_id: str, method: str, config: dict[str, Any], room_for: int | None, limit: int
) -> tuple[list[Job], bool]:
    """The model's open jobs of this method and configuration, oldest first, and whether their rows are
    locked. Locked: a job takes no target once a worker has claimed it (the claim changes its state under
    the same lock; a job claimed meanwhile is not found). With none open, the model's lock is taken and they
    are read again, so that concurrent requests do not each open a job (one that opens a job holds the
    model's lock until it commits). A request that fills a job opens the next without it: it holds that
    job's row, and the model's lock is taken before a job's (the claim's order), never after; two jobs
    opened at once then run one after the other.

    With ``room_for`` (samples), they are read without locks first, and returned so when the oldest has
    room for that many more without filling up (see ``open_targets_many``'s ``optimistic``)."""
    if room_for is not None:
        with session.no_autoflush:
            candidates = repository.open_batches(session, model_id, method, lock=False)
        jobs = [job for job in candidates if job.config == config]
        if jobs and jobs[0].sample_count + room_for < limit:
            return jobs, False
    while True:
        with session.no_autoflush:  # the jobs taken so far are written with the targets
            if models_repository.holds_lock(session, model_id):  # the claim's order: model, then jobs
                candidates = repository.open_batches(session, model_id, method)
                return [job for job in candidates if job.config == config], True
            # Without the model's lock, only the jobs of this configuration are locked: holding another
            # one's row while waiting for the model's lock would invert the claim's order (a deadlock).
            candidates = repository.open_batches(session, model_id, method, lock=False)
            matching = [job.id for job in candidates if job.config == config]
            jobs = list(repository.lock_open_batches(session, matching)) if matching else []
        if jobs:
            return jobs, True
        for job in candidates:  # read without a lock (and unchanged): read again under the model's
            session.expire(job)
        models_repository.lock_model(session, model_id)


def _job_update(job: Job, now: datetime) -> dict[str, Any]:
    """The row update of a job read here that took targets (or was sealed); its object then as if written."""
    values = {"sample_count": job.sample_count, "due_at": job.due_at, "batch_open": job.batch_open,
              "ready_at": job.ready_at, "updated_at": now}  # fmt: skip
    for key, value in values.items():
        set_committed_value(job, key, value)
    return {"id": job.id, **values}


def _enqueue(
    session: Session,
    settings: Settings,
    target: ErasureTarget,
    method: str,
    config: dict[str, Any],
    *,
    coalesce: bool,
    actor: str,
) -> list[Dispatch]:
    """Put the target into its model's open job of this method and configuration, or a new one (one of its
    own when not ``coalesce``); returns the jobs to dispatch."""
    now = utcnow()
    # The model's row lock serialises this with the claim: a job takes no target once a worker has it.
    models_repository.lock_model(session, target.model_id)
    dispatches: list[Dispatch] = []
    job = None
    if coalesce:
        with session.no_autoflush:  # a new target is written once it has its job
            candidates = repository.open_batches(session, target.model_id, method)
        for candidate in candidates:
            if candidate.config != config:
                continue
            if candidate.sample_count + target.pending_count <= settings.batch_max_samples:
                job = candidate
            else:
                dispatches.append(_seal(candidate, now))
            break
    if job is None:
        wait = settings.batch_wait_s if coalesce else 0.0
        job = _new_job(target, method, config, open_for=wait if coalesce else None)
        jobs_repository.add(session, job)
        dispatches.append(Dispatch(job.id, wait))
    _attach(session, job, target, actor)
    if job.batch_open and job.sample_count >= settings.batch_max_samples:
        dispatches.append(_seal(job, now))
    return dispatches


def _new_job(target: ErasureTarget, method: str, config: dict[str, Any], *, open_for: float | None) -> Job:
    """A queued job of the target's model; it takes more requests for ``open_for`` seconds (None: none)."""
    now = utcnow()
    return Job(
        id=new_id(), model_id=target.model_id, state="queued", method=method, config=config,
        batch_open=open_for is not None, sample_count=0, ready_at=now + timedelta(seconds=open_for or 0.0),
        due_at=target.due_at,
    )  # fmt: skip


def _attach(session: Session, job: Job, target: ErasureTarget, actor: str, *, flush: bool = True) -> None:
    job.sample_count += target.pending_count
    job.due_at = min(job.due_at, target.due_at) if job.due_at is not None else target.due_at
    target.job_id = job.id
    if flush:
        session.flush()
    trail.append(
        session, "erasure.queued", actor=actor, subject_type="erasure", subject_id=target.id,
        request_id=target.request_id,
        data={"model_id": target.model_id, "job_id": job.id, "samples": target.pending_count,
              "method": job.method, "batch_open": job.batch_open},
    )  # fmt: skip


def _seal(job: Job, now: datetime) -> Dispatch:
    """Close a full job to more requests and make it ready now."""
    job.batch_open = False
    job.ready_at = min(job.ready_at, now) if job.ready_at is not None else now
    return Dispatch(job.id)


def retry(
    session: Session,
    settings: Settings,
    failed: Sequence[tuple[ErasureTarget, dict[str, Any]]],
    actor: str,
    *,
    escalate_to: tuple[str, dict[str, Any]] | None,
) -> list[Dispatch]:
    """Targets that failed their audit inside a batch, each with the attempt that failed: recorded, then
    queued again: into the model's open job of ``escalate_to`` (method, full configuration), which the
    failures of the model's next batches join too (exact retraining has no batch effects to fear), or,
    without one, each alone in a job of its request's method (a batch's failure can come from the batch)."""
    dispatches: list[Dispatch] = []
    for target, attempt in failed:
        target.attempts = [*target.attempts, attempt]
        target.verdict = attempt.get("verdict")
        request = requests_repository.get(session, target.request_id)
        assert request is not None  # a foreign key
        trail.append(
            session, "erasure.retried", actor=actor, subject_type="erasure", subject_id=target.id,
            request_id=target.request_id, data={"model_id": target.model_id, **attempt},
        )  # fmt: skip
        method, config = escalate_to or (request.method, request.config)
        dispatches += _enqueue(
            session, settings, target, method, config, coalesce=escalate_to is not None, actor=actor
        )
    return dispatches


def complete(
    session: Session,
    settings: Settings,
    target: ErasureTarget,
    *,
    dataset_id: str,
    sample_ids: Sequence[str],
    version_id: str,
    attempt: dict[str, Any],
    actor: str,
) -> Dispatch:
    """The target's samples are erased from the model since ``version_id`` (activated in this
    transaction); its purge is queued (the request completes when it has run). Returns the purge job to
    dispatch once committed."""
    now = utcnow()
    pks = [sample.id for sample in datasets_repository.find_samples(session, dataset_id, sample_ids)]
    erased = repository.add_erased(session, target.model_id, pks, version_id, target.request_id, now)
    trail.append(
        session, "samples.erased", actor=actor, subject_type="samples", subject_id=target.model_id,
        request_id=target.request_id,
        data={"model_id": target.model_id, "version_id": version_id, "named": len(pks), "erased": erased},
    )  # fmt: skip
    purge = purges.schedule(session, settings, target)
    settle(session, target, "completed", actor, attempt=attempt, version_id=version_id)
    return Dispatch(purge.id, max(0.0, (purge.ready_at - now).total_seconds()) if purge.ready_at else 0.0)


def settle(
    session: Session,
    target: ErasureTarget,
    state: str,
    actor: str,
    *,
    attempt: dict[str, Any] | None = None,
    version_id: str | None = None,
    verdict: str | None = None,
) -> None:
    """End a target (and its request, when it was the last one pending)."""
    now = utcnow()
    if attempt is not None:
        target.attempts = [*target.attempts, attempt]
    _settle(session, target, state, now, actor, verdict=verdict or (attempt or {}).get("verdict"),
            version_id=version_id)  # fmt: skip
    request = requests_repository.get(session, target.request_id)
    assert request is not None
    settle_request_if_done(session, request, now, actor)


def settle_job(session: Session, job: Job, state: str, actor: str) -> None:
    """A job ended without per-request outcomes (failed, canceled): its pending targets end the same way."""
    pending = [t for t in repository.targets_of_job(session, job.id, lock=True) if t.state == "pending"]
    settle_many(session, pending, state, actor, attempt={"job_id": job.id, "state": state,
                                                          "error_reason": job.error_reason})  # fmt: skip


def settle_many(
    session: Session, targets: Sequence[ErasureTarget], state: str, actor: str, *, attempt: dict[str, Any]
) -> None:
    """:func:`settle` on each of many targets with one attempt (a job that ended without per-request
    outcomes), in a few statements whatever their number: their requests and those requests' targets read
    once, the rows written by one flush, the settled requests' reports generated together."""
    if not targets:
        return
    now = utcnow()
    request_ids = list(dict.fromkeys(target.request_id for target in targets))
    found = {request.id: request for request in requests_repository.get_many(session, request_ids)}
    requests = [found[request_id] for request_id in request_ids]
    siblings = repository.targets_of_requests(session, request_ids)
    for target in targets:
        target.attempts = [*target.attempts, attempt]
        _settle(session, target, state, now, actor, verdict=attempt.get("verdict"), flush=False)
    settled = [
        request for request in requests if _close_request(session, request, siblings[request.id], now, actor)
    ]
    session.flush()
    _settled(session, settled, now, actor)


def _settle(
    session: Session,
    target: ErasureTarget,
    state: str,
    when: datetime,
    actor: str,
    *,
    verdict: str | None,
    version_id: str | None = None,
    flush: bool = True,
) -> None:
    target.state = state
    target.verdict = verdict
    target.result_version_id = version_id
    target.settled_at = when
    if flush:
        session.flush()
    trail.append(
        session, f"erasure.{state}", actor=actor, subject_type="erasure", subject_id=target.id,
        request_id=target.request_id,
        data={"model_id": target.model_id, "verdict": verdict, "version_id": version_id,
              "job_id": target.job_id},
    )  # fmt: skip


def settle_request_if_done(session: Session, request: DeletionRequest, when: datetime, actor: str) -> None:
    """Close a processing request once no target is pending: completed only when every model completed and
    every copy those erasures cover was purged (until then it stays processing: see service.purges)."""
    if request.state != "processing":
        return
    if _close_request(session, request, repository.targets_of_request(session, request.id), when, actor):
        session.flush()
        _settled(session, [request], when, actor)


def _close_request(
    session: Session, request: DeletionRequest, targets: Sequence[ErasureTarget], when: datetime, actor: str
) -> bool:
    """Settle the processing request unless one of its ``targets`` (all of them) keeps it open; True if so."""
    if request.state != "processing":
        return False
    states = {target.state for target in targets}
    if "pending" in states:
        return False
    unfulfilled = next((state for state in _UNFULFILLED if state in states), None)
    if unfulfilled is None and purges.awaiting_purge(targets):
        return False
    request.state = unfulfilled or "completed"
    request.completed_at = when
    trail.append(
        session, "request.settled", actor=actor, subject_type="request", subject_id=request.id,
        request_id=request.id, data={"state": request.state, "completed_at": when.isoformat()},
    )  # fmt: skip
    return True


def _settled(session: Session, requests: Sequence[DeletionRequest], when: datetime, actor: str) -> None:
    """What follows the settling of requests (written): their reports, and their webhook events' outbox rows,
    in this transaction: sent only if the settlement commits."""
    generate_reports(session, requests, actor)
    webhooks.requests_settled(session, requests, when)


def targets_of_request(session: Session, request_id: str) -> Sequence[ErasureTarget]:
    return repository.targets_of_request(session, request_id)


def targets_of_job(session: Session, job_id: str) -> Sequence[ErasureTarget]:
    return repository.targets_of_job(session, job_id, lock=True)


def request_ids_of_jobs(session: Session, job_ids: Sequence[str]) -> dict[str, list[str]]:
    return repository.request_ids_of_jobs(session, job_ids) if job_ids else {}


def pending_samples(
    session: Session, targets: Sequence[ErasureTarget], model_id: str
) -> dict[str, list[str]]:
    """Per target id: the external ids of its request's samples the model still holds, by row."""
    by_request = repository.pending_samples(session, [t.request_id for t in targets], model_id)
    return {target.id: by_request[target.request_id] for target in targets}
