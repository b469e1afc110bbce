"""What the console's pages show, read through the domain services and repositories the API uses, always for
the caller's tenant (another tenant's ids are as unknown as missing ones). Never writes (downloads go through
the API's own route functions: ``routes.py``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session

from service.audit import service as audit_service
from service.audit.tables import AuditReferenceSet
from service.clients.service import Principal
from service.core.problems import NotFound
from service.datasets.tables import Dataset
from service.deletion_requests import service as requests_service
from service.deletion_requests.routes import request_out
from service.deletion_requests.tables import REQUEST_STATES, DeletionRequest
from service.erasures.tables import ErasureTarget
from service.jobs import service as jobs_service
from service.jobs.schemas import JobOut
from service.jobs.tables import ACTIVE_STATES
from service.metrics.collector import (
    DAYS_LEFT_BUCKETS,
    days_left_bucket,
    open_requests_by_days_left,
    requests_by_state,
    verdict_counts,
)
from service.models import repository as models_repository
from service.models import service as models_service
from service.models.tables import Model, ModelVersion
from service.reports.tables import ErasureReport
from service.trail import service as trail_service
from service.trail.tables import GENESIS, TrailEvent

# An open request this close to its due date, or past it, stands out in the queue: the metrics' buckets below
# three days, where a job that has not started yet may no longer finish in time.
AT_RISK_BUCKETS = frozenset(DAYS_LEFT_BUCKETS[:3])
QUEUE_PAGE = 100  # rows on one page of the queue; the counts above it always cover every request
OPEN = "open"  # the queue's default: requests still processing
UNFINISHED_JOB_STATES = ("queued", *sorted(ACTIVE_STATES))


@dataclass(frozen=True)
class QueueFilters:
    state: str = OPEN  # open | all | a request state
    model: str | None = None
    verdict: str | None = None
    due_from: date | None = None
    due_to: date | None = None

    def states(self) -> tuple[str, ...] | None:
        if self.state == "all":
            return None
        return ("processing",) if self.state == OPEN else (self.state,)


@dataclass(frozen=True)
class ErasureSummary:
    model: str
    state: str
    verdict: str | None


@dataclass(frozen=True)
class QueueRow:
    request: DeletionRequest
    days_left: float
    bucket: str
    at_risk: bool
    erasures: list[ErasureSummary]


@dataclass(frozen=True)
class Queue:
    rows: list[QueueRow]
    total: int  # every request the filters match
    first: int  # the 1-based place of the first row among them
    by_state: dict[str, int]
    by_days_left: dict[str, int]
    verdicts: dict[str, int]
    models: list[str]  # the tenant's model names, for the filter


def _of_tenant(statement: Select[Any], tenant: str) -> Select[Any]:
    return statement.join(Dataset, Dataset.id == DeletionRequest.dataset_id).where(Dataset.tenant == tenant)


def _filtered(statement: Select[Any], session: Session, tenant: str, filters: QueueFilters) -> Select[Any]:
    statement = _of_tenant(statement, tenant)
    states = filters.states()
    if states is not None:
        statement = statement.where(DeletionRequest.state.in_(states))
    if filters.model:
        model = models_repository.get_model_by_name(session, tenant, filters.model)
        # A name the tenant does not have matches no request (as another tenant's model would).
        model_id = model.id if model is not None else ""
        statement = statement.where(
            exists().where(ErasureTarget.request_id == DeletionRequest.id, ErasureTarget.model_id == model_id)
        )
    if filters.verdict:
        statement = statement.where(
            exists().where(
                ErasureTarget.request_id == DeletionRequest.id, ErasureTarget.verdict == filters.verdict
            )
        )
    if filters.due_from:
        statement = statement.where(DeletionRequest.due_at >= _midnight(filters.due_from))
    if filters.due_to:
        statement = statement.where(DeletionRequest.due_at < _midnight(filters.due_to + timedelta(days=1)))
    return statement


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def verdict_words() -> dict[str | None, str]:
    """Each verdict in words, as the report's PDF says it."""
    from service.reports.pdf import VERDICT_WORDS  # matplotlib: with the first page that names verdicts

    return VERDICT_WORDS


def work_queue(session: Session, tenant: str, filters: QueueFilters, now: datetime, page: int = 1) -> Queue:
    """The tenant's requests the filters match, earliest due first, with the counts ``/metrics`` reports
    (the same queries, for this tenant)."""
    requests = session.scalars(
        _filtered(select(DeletionRequest), session, tenant, filters)
        .order_by(DeletionRequest.due_at, DeletionRequest.received_at, DeletionRequest.id)
        .offset((page - 1) * QUEUE_PAGE)
        .limit(QUEUE_PAGE)
    ).all()
    total = session.scalar(_filtered(select(func.count(DeletionRequest.id)), session, tenant, filters)) or 0
    erasures = _erasure_summaries(session, [request.id for request in requests])
    rows = []
    for request in requests:
        bucket = days_left_bucket(request.due_at, now)
        rows.append(
            QueueRow(
                request=request,
                days_left=(request.due_at - now).total_seconds() / 86_400,
                bucket=bucket,
                at_risk=request.state == "processing" and bucket in AT_RISK_BUCKETS,
                erasures=erasures.get(request.id, []),
            )
        )
    by_state = requests_by_state(session, tenant)
    return Queue(
        rows=rows,
        total=int(total),
        first=(page - 1) * QUEUE_PAGE + 1,
        by_state={state: by_state.get(state, 0) for state in REQUEST_STATES},
        by_days_left=open_requests_by_days_left(session, now, tenant),
        verdicts=verdict_counts(session, tenant),
        models=list(session.scalars(select(Model.name).where(Model.tenant == tenant).order_by(Model.name))),
    )


def _erasure_summaries(session: Session, request_ids: Sequence[str]) -> dict[str, list[ErasureSummary]]:
    found: dict[str, list[ErasureSummary]] = {}
    rows = session.execute(
        select(ErasureTarget.request_id, Model.name, ErasureTarget.state, ErasureTarget.verdict)
        .join(Model, Model.id == ErasureTarget.model_id)
        .where(ErasureTarget.request_id.in_(request_ids))
        .order_by(Model.name)
    ).all()
    for request_id, model, state, verdict in rows:
        found.setdefault(request_id, []).append(ErasureSummary(model, state, verdict))
    return found


@dataclass(frozen=True)
class TrailCheck:
    """The request's events checked link by link: each must hash to its recorded hash from its recorded
    previous hash, and that previous hash must be the recorded hash of the event before it in the chain."""

    valid: bool
    events: int
    first_broken_seq: int | None = None
    reason: str | None = None


def check_request_trail(session: Session, events: Sequence[TrailEvent]) -> TrailCheck:
    previous = {
        event.seq: event.hash
        for event in session.scalars(
            select(TrailEvent).where(TrailEvent.seq.in_([event.seq - 1 for event in events]))
        )
    }
    for event in events:
        expected_prev = previous.get(event.seq - 1, GENESIS if event.seq == 1 else None)
        if expected_prev is None:
            return TrailCheck(False, len(events), event.seq, "the event before it is missing")
        if event.prev_hash != expected_prev:
            return TrailCheck(
                False, len(events), event.seq, "its previous hash is not the hash of the event before it"
            )
        if trail_service.event_hash(event.prev_hash, event) != event.hash:
            return TrailCheck(
                False, len(events), event.seq, "its content does not hash to its recorded hash: it was edited"
            )
    return TrailCheck(True, len(events))


@dataclass(frozen=True)
class Evidence:
    index: int  # the erasure's place in the report (the figures' address)
    model: str
    membership: dict[str, Any]
    utility: dict[str, Any]


@dataclass(frozen=True)
class RequestPage:
    request: dict[str, Any]  # GET /deletion-requests/{id}'s answer (a purge record included once it exists)
    report: ErasureReport | None
    evidence: list[Evidence]
    events: Sequence[TrailEvent]
    trail: TrailCheck
    whole_chain: trail_service.ChainCheck | None  # admins: the whole chain (every tenant's events)


def request_page(session: Session, request_id: str, caller: Principal) -> RequestPage:
    request = requests_service.get_request(session, request_id, caller.tenant)
    report = session.get(ErasureReport, request.id)
    evidence = []
    if report is not None:
        for index, erasure in enumerate(json.loads(report.facts)["erasures"]):
            if erasure.get("evidence"):
                found = erasure["evidence"]
                evidence.append(
                    Evidence(index, erasure["model"]["name"], found["membership"], found["utility"])
                )
    events = session.scalars(
        select(TrailEvent).where(TrailEvent.request_id == request.id).order_by(TrailEvent.seq)
    ).all()
    shown = request_out(session, request).model_dump(mode="json")
    return RequestPage(
        request=shown,
        report=report,
        evidence=evidence,
        events=events,
        trail=check_request_trail(session, events),
        whole_chain=trail_service.verify_chain(session) if caller.allows("admin") else None,
    )


def evidence_svg(session: Session, request_id: str, tenant: str, index: int, kind: str) -> bytes:
    """One of the report's evidence figures as SVG: the function that draws it on the PDF's evidence page."""
    from service.reports.pdf import EVIDENCE_FIGURES, evidence_svg  # matplotlib: with the first figure

    request = requests_service.get_request(session, request_id, tenant)
    report = session.get(ErasureReport, request.id)
    erasures = json.loads(report.facts)["erasures"] if report is not None else []
    if kind not in EVIDENCE_FIGURES or not 0 <= index < len(erasures) or not erasures[index].get("evidence"):
        raise NotFound("evidence-not-found", f"request {request_id} has no such evidence figure")
    return evidence_svg(erasures[index]["evidence"], kind)


@dataclass(frozen=True)
class VersionRow:
    version: ModelVersion
    parent_number: int | None
    covered_request_ids: list[str]
    erased_sample_count: int


@dataclass(frozen=True)
class ModelPage:
    model: Model
    versions: list[VersionRow]
    references: AuditReferenceSet | None
    jobs: list[tuple[JobOut, JobProgress]] | None  # None: the caller may not read jobs


def models(session: Session, tenant: str) -> list[tuple[Model, ModelVersion | None]]:
    found = session.scalars(select(Model).where(Model.tenant == tenant).order_by(Model.name)).all()
    return [(model, models_repository.active_version(session, model.id)) for model in found]


def model_page(session: Session, name: str, caller: Principal, now: datetime) -> ModelPage:
    model = models_service.get_model(session, name, caller.tenant)
    versions = models_service.list_versions(session, model)
    covered = models_service.covered_request_ids(session, versions)
    erased = models_service.erased_sample_counts(session, model)
    numbers = {version.id: version.number for version in versions}
    jobs = None
    if caller.allows("jobs:read"):
        unfinished = [
            job
            for state in UNFINISHED_JOB_STATES
            for job in jobs_service.list_jobs(
                session, tenant=caller.tenant, model_name=name, state=state, cursor=None, limit=50
            ).items
        ]
        request_ids = jobs_service.request_ids(session, [job.id for job in unfinished])
        outs = [JobOut.from_job(job, now, request_ids.get(job.id, [])) for job in unfinished]
        jobs = [(out, JobProgress.of(out)) for out in outs]
    return ModelPage(
        model=model,
        versions=[
            VersionRow(
                version,
                numbers.get(version.parent_id) if version.parent_id else None,
                covered.get(version.id, []),
                erased.get(version.id, 0),
            )
            for version in versions
        ],
        references=audit_service.current_set(session, model.id),
        jobs=jobs,
    )


@dataclass(frozen=True)
class JobProgress:
    """A job's progress as the models page shows it, on first render and at each poll."""

    id: str
    state: str
    done: bool
    value: int
    max: int
    text: str

    @classmethod
    def of(cls, job: JobOut) -> JobProgress:
        progress = job.progress.model_dump() if job.progress else {}
        # Unlearning counts steps; a reference build counts the reference models it trains, as epochs.
        unit = "step" if progress.get("total_steps") else "epoch" if progress.get("total_epochs") else None
        value, total = (progress.get(unit) or 0, progress[f"total_{unit}s"]) if unit else (0, 1)
        phase = f": {progress['phase']}" if progress.get("phase") else ""
        counted = f", {unit} {value} of {total}" if unit else ""
        return cls(job.id, job.state, job.done, value, total, f"{job.state}{phase}{counted}")


def job_progress(session: Session, job_id: str, tenant: str, now: datetime) -> JobProgress:
    """What the models page polls for a running job."""
    return JobProgress.of(JobOut.from_job(jobs_service.get_job(session, job_id, tenant), now, []))
