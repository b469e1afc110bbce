"""The job state machine and the worker-facing API. Never commits: the caller (route or task) does.

``queued -> running -> evaluating -> succeeded | rejected | failed | canceled``; a queued job can also be
canceled (or failed by an operator) before it starts. An unlearning job holds one or more erasure targets
(``service.erasures``: one deletion request's erasure from the job's model). A worker's life cycle for one
job, each step its own transaction::

    claimed = claim_job(s, job_id, worker_id, lease)   # None: nothing to do; NotReady: look again later
    sets = datasets.service.resolve_sets(s, claimed.dataset_id, claimed.model_id, claimed.forget_sample_ids)
    stop = record_progress(s, claimed.job_id, {...}, worker_id, lease)  # renews the lease; True: stop
    set_state(s, claimed.job_id, "evaluating")
    # the outcome, in ONE transaction:
    version = models.service.register_version(s, ..., activate=any_passed, request_ids=[...passed])
    erasures.service.complete(s, target, ...)    # per target whose audit passed; retry_alone / settle others
    finish(s, claimed.job_id, "succeeded", metrics=..., result_version_id=version.id)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.clock import utcnow
from service.core.pagination import Page, decode_time_key, encode_time_cursor, page_from_rows
from service.core.problems import Conflict, NotFound
from service.datasets import repository as datasets_repository
from service.erasures import service as erasures
from service.erasures.tables import ErasureTarget
from service.jobs import repository
from service.jobs.tables import ACTIVE_STATES, TERMINAL_STATES, Job
from service.models import repository as models_repository
from service.trail import service as trail

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "canceled", "failed"}),
    "running": frozenset({"evaluating", "failed", "canceled"}),
    "evaluating": frozenset({"succeeded", "rejected", "failed", "canceled"}),
}
# A reference build has nothing to evaluate or reject: it succeeds straight from running.
BUILD_TRANSITIONS = {**TRANSITIONS, "running": frozenset({"succeeded", "failed", "canceled"})}


class InvalidTransition(Conflict):
    pass


@dataclass(frozen=True)
class VersionRef:
    id: str
    number: int
    sha256: str
    storage_uri: str


@dataclass(frozen=True)
class ClaimedTarget:
    """One request's erasure inside a claimed job: the samples of the request the model still holds."""

    target_id: str
    request_id: str
    sample_ids: tuple[str, ...]


@dataclass(frozen=True)
class ClaimedJob:
    """Everything a worker needs to run a job, read in the transaction that claimed it."""

    job_id: str
    kind: str  # unlearn | build_references
    targets: tuple[ClaimedTarget, ...]  # none for a reference build
    model_id: str
    model_name: str
    spec: dict[str, Any]  # ModelSpec.to_dict()
    training_recipe: dict[str, Any] | None  # how the model was trained (None: the engine's default)
    base_version: VersionRef  # the active version at claim time: the parent of the result
    dataset_id: str
    array_uri: str  # the dataset's array in the store (a server path for datasets registered before)
    method: str
    config: dict[str, Any]  # the full configuration (defaults included), for make_config(method, config)
    forget_sample_ids: tuple[str, ...]  # the union of the targets' samples, by row
    state: str  # running, or evaluating when an abandoned job is claimed again
    resume: dict[str, Any]  # what an earlier attempt committed in ``metrics`` (steps it need not redo)


@dataclass(frozen=True)
class NotReady:
    """The message came before its job's coalescing wait ended (and nothing else can be taken): deliver it
    again in ``retry_in`` seconds."""

    retry_in: float


def _of_tenant(session: Session, job: Job | None, tenant: str) -> bool:
    if job is None:
        return False
    model = models_repository.get_model(session, job.model_id)
    return model is not None and model.tenant == tenant


def get_job(session: Session, job_id: str, tenant: str) -> Job:
    """The tenant's job (another tenant's is as unknown as a missing one)."""
    job = repository.get(session, job_id)
    if job is None or not _of_tenant(session, job, tenant):
        raise NotFound("job-not-found", f"no job {job_id!r}", job_id=job_id)
    return job


def claim_job(
    session: Session, job_id: str, worker_id: str, lease: timedelta
) -> ClaimedJob | NotReady | None:
    """Take a job for ``worker_id`` with a lease of ``lease``, from the message that names ``job_id``.

    A running or evaluating ``job_id`` whose lease lapsed (its worker died) is taken over as it stands: same
    base version, ``resume`` holding what its earlier attempt committed. Otherwise the worker takes the most
    urgent ready job (earliest due date, then oldest), ``job_id`` or another: jobs of one model run one after
    another, each from the version the previous produced, and a message is a ticket to run one job.
    Returns :class:`NotReady` when ``job_id`` is still in its coalescing wait, None when there is nothing to
    do now: the message was redundant, or every ready job is of a busy model (the worker that ends a model's
    job sends a message for the model's next one: :func:`next_queued`). Commit right after: the model's row
    stays locked until then.
    """
    now = utcnow()
    named = repository.get(session, job_id)
    if named is not None and named.state in ACTIVE_STATES and _claimable(named, now):
        claimed = _take(session, job_id, worker_id, lease, now)
        if claimed is not None:
            return claimed
    for candidate in repository.ready_ids(session, now):
        claimed = _take(session, candidate, worker_id, lease, now)
        if claimed is not None:
            return claimed
    if named is not None and named.state == "queued" and named.ready_at is not None and named.ready_at > now:
        return NotReady(retry_in=max(0.1, (named.ready_at - now).total_seconds()))
    return None


def claim_ready_purge(session: Session, model_id: str, worker_id: str, lease: timedelta) -> ClaimedJob | None:
    """The model's purge job, when one is queued and ready now: the worker that has just completed a model's
    erasures runs their purge at once (``LETHE_PURGE_AFTER`` 0), before anything else takes the model."""
    now = utcnow()
    for job_id in repository.ready_purge_ids(session, model_id, now):
        claimed = _take(session, job_id, worker_id, lease, now)
        if claimed is not None:
            return claimed
    return None


def next_queued(session: Session, model_id: str) -> tuple[str, float] | None:
    """The model's most urgent queued job and the seconds until it is ready: what a worker that has just
    ended one of the model's jobs sends on (no message waits on a busy model)."""
    found = repository.next_queued(session, model_id)
    if found is None:
        return None
    job_id, ready_at = found
    return job_id, max(0.0, (ready_at - utcnow()).total_seconds()) if ready_at is not None else 0.0


def _take(
    session: Session, job_id: str, worker_id: str, lease: timedelta, now: datetime
) -> ClaimedJob | None:
    """Claim one job if it is still claimable and no other job of its model is active (checked under the
    model's row lock, so two workers cannot both pass)."""
    job = repository.get(session, job_id)
    if job is None:
        return None
    model = models_repository.lock_model(session, job.model_id)
    job = repository.lock(session, job_id)
    if model is None or job is None or not _claimable(job, now):
        return None
    if job.state == "queued" and job.ready_at is not None and job.ready_at > now:
        return None
    if repository.active_job_id(session, model.id, excluding=job.id) is not None:
        return None
    fresh = job.state == "queued"
    if fresh:
        base = models_repository.active_version(session, model.id)
        job.state = "running"
        job.started_at = now
        job.batch_open = False
    else:
        base = models_repository.get_version(session, job.base_version_id or "")
    dataset = datasets_repository.get_dataset(session, model.dataset_id)
    if base is None or dataset is None:  # pragma: no cover - a model is created with an active version
        raise RuntimeError(f"model {model.id} has no active version or dataset")
    job.worker_id = worker_id
    job.base_version_id = base.id
    job.lease_expires_at = now + lease
    session.flush()
    kind = "job.running" if fresh else "job.taken_over"  # another worker's lease lapsed
    _record(session, job, kind, worker_id, {"base_version": base.number, "state": job.state})
    targets = erasures.targets_of_job(session, job.id)
    pending = erasures.pending_samples(session, targets, model.id)
    claimed_targets = tuple(
        ClaimedTarget(t.id, t.request_id, tuple(pending[t.id])) for t in targets if t.state == "pending"
    )
    return ClaimedJob(
        job_id=job.id,
        kind=job.kind,
        targets=claimed_targets,
        model_id=model.id,
        model_name=model.name,
        spec=dict(model.spec),
        training_recipe=dict(model.training_recipe) if model.training_recipe is not None else None,
        base_version=VersionRef(base.id, base.number, base.checkpoint_sha256, base.storage_uri),
        dataset_id=dataset.id,
        array_uri=dataset.array_uri,
        method=job.method,
        config=dict(job.config),
        # Requests may share samples (one subject asked twice): each is unlearned once.
        forget_sample_ids=tuple(dict.fromkeys(s for t in claimed_targets for s in t.sample_ids)),
        state=job.state,
        resume=dict(job.metrics or {}),
    )


def _claimable(job: Job, now: datetime) -> bool:
    if job.state == "queued":
        return True
    return job.state in ACTIVE_STATES and (job.lease_expires_at is None or job.lease_expires_at <= now)


def record_progress(
    session: Session, job_id: str, progress: dict[str, Any], worker_id: str, lease: timedelta
) -> bool:
    """Store ``{step, total_steps, epoch, total_epochs, losses}`` and renew ``worker_id``'s lease; True when
    the worker should stop.

    That is when a cancel was requested, or when the job is no longer running or evaluating (finished, or
    canceled) or another worker claimed it: a worker must not keep going on a job it no longer owns.
    """
    now = utcnow()
    cancel_requested = repository.save_progress(session, job_id, worker_id, progress, now, now + lease)
    return cancel_requested is None or cancel_requested


def set_state(
    session: Session,
    job_id: str,
    state: str,
    *,
    metrics: dict[str, Any] | None = None,
    worker_id: str | None = None,
) -> Job:
    """A non-terminal transition (``running -> evaluating``); terminal states go through :func:`finish`.

    ``metrics`` records what the finished steps produced, so a job claimed again resumes after them.
    """
    if state in TERMINAL_STATES:
        raise ValueError(f"{state!r} is terminal: use finish()")
    job = _transition(session, job_id, state, worker_id)
    if state == "evaluating":
        job.evaluation_started_at = utcnow()
    if metrics is not None:
        job.metrics = metrics
    session.flush()
    _record(session, job, f"job.{state}", worker_id or "api")
    return job


def finish(
    session: Session,
    job_id: str,
    state: str,
    *,
    metrics: dict[str, Any] | None = None,
    result_version_id: str | None = None,
    error_reason: str | None = None,
    error_detail: str | None = None,
    worker_id: str | None = None,
    settle_limit: int | None = None,
) -> Job:
    """End the job in a terminal state; a failed or canceled job ends its pending erasure targets the same
    way (a succeeded or rejected one has settled each target by its own audit before this): all of them, or
    the first ``settle_limit``, the rest by :func:`settle_pending` in transactions of their own.

    ``succeeded`` needs the activated ``result_version_id``; ``rejected`` may point at the rejected version;
    ``failed`` and ``canceled`` should carry ``error_reason`` (a short machine-readable slug) and a detail.
    A worker passes its ``worker_id``: a job another worker has since claimed is not its to finish.
    """
    if state not in TERMINAL_STATES:
        raise ValueError(f"{state!r} is not terminal: use set_state()")
    job = _transition(session, job_id, state, worker_id)
    if state == "succeeded" and job.kind == "unlearn" and result_version_id is None:
        raise ValueError("a succeeded unlearning job needs its result version")
    now = utcnow()
    job.finished_at = now
    job.metrics = metrics if metrics is not None else job.metrics
    job.result_version_id = result_version_id
    job.error_reason = error_reason
    job.error_detail = error_detail
    session.flush()
    actor = worker_id or "api"
    _record(
        session,
        job,
        f"job.{state}",
        actor,
        {"error_reason": error_reason, "result_version_id": result_version_id},
    )
    if state in ("failed", "canceled"):
        if settle_limit is None:
            erasures.settle_job(session, job, state, actor)
        else:
            settle_pending(session, job_id, actor, limit=settle_limit)
    return job


# Targets a canceled job settles per transaction: each settles its request and generates its report, so a
# job of thousands is settled in bounded transactions, none holding the job's row for long.
SETTLE_CHUNK = 250


def settle_pending(session: Session, job_id: str, actor: str, *, limit: int = SETTLE_CHUNK) -> int:
    """Settle up to ``limit`` of a finished (failed or canceled) job's pending targets as the job ended,
    recording the progress in ``job.progress``; returns how many are still pending. Commit after each call."""
    job = repository.lock(session, job_id)
    if job is None or job.state not in ("failed", "canceled"):
        return 0
    pending = select(ErasureTarget).where(ErasureTarget.job_id == job_id, ErasureTarget.state == "pending")
    targets = session.scalars(pending.order_by(ErasureTarget.due_at).limit(limit).with_for_update()).all()
    attempt = {"job_id": job.id, "state": job.state, "error_reason": job.error_reason}
    # Held while the chunk settles: the reports read the job's model and dataset, and the session finds them
    # in hand (it keeps only the objects something refers to).
    model = models_repository.get_model(session, job.model_id)
    in_hand = (model, datasets_repository.get_dataset(session, model.dataset_id) if model else None)
    erasures.settle_many(session, targets, job.state, actor, attempt=attempt)
    del in_hand
    left = session.scalar(select(func.count()).select_from(pending.subquery())) or 0
    total = len(targets) + left + int((job.progress or {}).get("settled", 0))
    if total:
        job.progress = {"phase": "settling", "settled": total - left, "total": total}
        session.flush()
    return int(left)


def _record(session: Session, job: Job, kind: str, actor: str, data: dict[str, Any] | None = None) -> None:
    # A job may hold many requests: its events name none; each request's erasure events name the job.
    trail.append(
        session, kind, actor=actor, subject_type="job", subject_id=job.id, request_id=None,
        data={"kind": job.kind, "model_id": job.model_id, **(data or {})},
    )  # fmt: skip


def record_metrics(session: Session, job_id: str, entries: dict[str, Any], worker_id: str) -> Job:
    """Merge ``entries`` into a running job's metrics (the job must still be ``worker_id``'s)."""
    job = repository.lock(session, job_id)
    if job is None:
        raise NotFound("job-not-found", f"no job {job_id!r}", job_id=job_id)
    if job.worker_id != worker_id:
        raise InvalidTransition("job-not-owned", f"job {job_id} is held by {job.worker_id}", state=job.state)
    job.metrics = {**(job.metrics or {}), **entries}
    session.flush()
    return job


def request_cancel(session: Session, job_id: str, tenant: str, actor: str) -> Job:
    """Cancel the tenant's queued job at once, settling its first :data:`SETTLE_CHUNK` requests (the caller
    settles the rest with :func:`settle_pending`, a transaction each); flag a running one for the worker to
    stop cooperatively. A canceled job with requests still to settle is answered as it stands.

    A job already in a terminal state is a :class:`~service.core.problems.Conflict` (409).
    """
    get_job(session, job_id, tenant)
    job = repository.lock(session, job_id)
    if job is None:
        raise NotFound("job-not-found", f"no job {job_id!r}", job_id=job_id)
    settling = job.progress or {}
    if (
        job.state == "canceled"
        and settling.get("phase") == "settling"
        and settling["settled"] < settling["total"]
    ):
        return job  # a cancel cut short: the route goes on settling
    if job.state in TERMINAL_STATES:
        raise InvalidTransition("job-finished", f"job {job_id} is already {job.state}", state=job.state)
    if job.kind == "purge":  # the law's part of an erasure already done: no client may stop it
        raise InvalidTransition(
            "purge-not-cancelable", f"job {job_id} purges erased data; it cannot be canceled", state=job.state
        )
    if job.state == "queued":
        return finish(
            session, job_id, "canceled", error_reason="canceled", error_detail="canceled before it started",
            settle_limit=SETTLE_CHUNK,
        )  # fmt: skip
    job.cancel_requested = True
    session.flush()
    _record(session, job, "job.cancel_requested", actor)
    return job


def list_abandoned(session: Session) -> list[str]:
    """Ids of running or evaluating jobs whose lease lapsed: their worker died; a claim resumes them."""
    return repository.abandoned_ids(session, utcnow())


def list_jobs(
    session: Session,
    *,
    tenant: str,
    model_name: str | None,
    state: str | None,
    cursor: str | None,
    limit: int,
) -> Page[Job]:
    """The tenant's jobs newest first, optionally of one model (by name) and in one state."""
    model_id = None
    if model_name is not None:
        model = models_repository.get_model_by_name(session, tenant, model_name)
        if model is None:  # a filter naming no model: 404, as the model's own path would answer
            raise NotFound(
                "model-not-found", f"no model named {model_name!r}", field="model", model=model_name
            )
        model_id = model.id
    before = decode_time_key(cursor) if cursor else None
    rows = repository.list_jobs(
        session, tenant=tenant, model_id=model_id, state=state, before=before, limit=limit + 1
    )
    return page_from_rows(rows, limit, key_of=lambda job: (job.created_at, job.id), encode=encode_time_cursor)


def request_ids(session: Session, job_ids: list[str]) -> dict[str, list[str]]:
    """Per job: the deletion requests it holds."""
    return erasures.request_ids_of_jobs(session, job_ids)


def list_stale_queued(session: Session, older_than: datetime) -> list[str]:
    """Ids of jobs still queued that were created before ``older_than``, oldest first.

    For a sweeper that re-dispatches them: the queue may have lost the message (Redis restart, failed
    dispatch). Re-sending a job whose message still exists is harmless: :func:`claim_job` runs it once.
    """
    return repository.stale_queued_ids(session, older_than)


def _transition(session: Session, job_id: str, state: str, worker_id: str | None = None) -> Job:
    job = repository.lock(session, job_id)
    if job is None:
        raise NotFound("job-not-found", f"no job {job_id!r}", job_id=job_id)
    if worker_id is not None and job.worker_id != worker_id:
        raise InvalidTransition("job-not-owned", f"job {job_id} is held by {job.worker_id}", state=job.state)
    # Only unlearning evaluates: a reference build or a purge succeeds straight from running.
    transitions = TRANSITIONS if job.kind == "unlearn" else BUILD_TRANSITIONS
    if state not in transitions.get(job.state, frozenset()):
        raise InvalidTransition(
            "invalid-transition", f"job {job_id} cannot go from {job.state} to {state}", state=job.state
        )
    job.state = state
    return job
