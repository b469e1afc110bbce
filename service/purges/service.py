"""Purge: once a request's erasure from a model completes, every copy Lethe holds of what it erased goes.
Torch-free and never commits; the worker's purge stage (worker/pipeline/purge.py) does the byte work.

What a model's purge deletes (``plan``):
- the checkpoint of every version that still holds an erased sample: a version holds sample s unless the
  version that erased s is itself or one of its ancestors, so the pre-erasure base, every superseded
  ancestor, and rejected or candidate versions derived from them; each version stays as a tombstone
  (status ``purged``, digest, size, when, why) so lineage and reports still resolve. Checkpoints of jobs
  that failed or were canceled on such a base go too. An object another live version still references is
  kept and said so;
- the model's superseded audit reference sets, and the erased samples' columns of the current one;
- the dataset array's rows of samples every model of the dataset has erased (a new generation of the
  array, row numbers kept, the rows zeroed; the old blob and the input it was adopted from deleted), and
  their labels.
And the identifiers: the erased samples' subjects and the requests' subjects kept only as keyed hashes
(service.purges.pseudonyms), the idempotency answers that echoed the requests dropped.

When: a completed target joins its model's queued purge job (``schedule``), ready after
``LETHE_PURGE_AFTER`` and never past the earliest due date it holds. A request is ``completed`` only once
every target it completed has been purged (``erasures.service.settle_request_if_done``): the state is a legal
statement, and copies still held would make it false. Raw rows that other models still need (a model-scoped
request on a shared dataset) are not the request's copies to delete; its report names them as kept.

Every purge is first written as a record of the erasure ledger, in the store, outside the database
(``PurgeRecord``); ``apply`` makes the database say what the record says, idempotently, so the purge and the
replay after a database restore (``lethe purge replay``) are one code path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, true, update
from sqlalchemy.orm import Session, sessionmaker

from service.audit.tables import AuditReferenceSet
from service.core.clock import utcnow
from service.core.settings import Settings
from service.datasets.service import DATA_SOURCE, INPUT_SOURCE
from service.datasets.tables import Dataset, Sample
from service.deletion_requests.tables import DeletionRequest
from service.erasures.tables import ErasedSample, ErasureTarget
from service.idempotency.tables import IdempotencyRecord
from service.jobs import repository as jobs_repository
from service.jobs.tables import TERMINAL_STATES, Job
from service.models import repository as models_repository
from service.models.tables import Model, ModelVersion
from service.purges.pseudonyms import subject_hash
from service.purges.tables import PurgedObject
from service.reports.tables import ErasureReport
from service.storage import CachedStore, ObjectStore
from service.trail import service as trail

PURGE_KIND = "purge"
RECORD_FORMAT = "lethe-purge/1"


@dataclass(frozen=True)
class ObjectRef:
    sha256: str
    size: int
    uri: str


@dataclass
class PurgeRecord:
    """One purge, as the erasure ledger keeps it (JSON, no plain identifier: sample keys, row numbers,
    keyed hashes). ``objects`` are deleted from the store; the rest is what the database must say."""

    job_id: str
    model_id: str
    dataset_id: str
    created_at: str
    versions: list[dict[str, Any]] = field(default_factory=list)  # {id, number, sha256, size, reason}
    objects: list[dict[str, Any]] = field(default_factory=list)  # {sha256, size, uri, kind, reason}
    kept: list[dict[str, Any]] = field(default_factory=list)  # objects left, and why
    inputs: list[str] = field(default_factory=list)  # array sources to delete (data:<path> | inputs:<key>)
    reference_sets: list[dict[str, Any]] = field(default_factory=list)  # {id, new: ObjectRef | None, ...}
    array: dict[str, Any] | None = None  # {old: uri, new: ObjectRef, rows: [...]}
    purged_samples: list[int] = field(default_factory=list)  # rows zeroed, labels dropped
    subjects: dict[str, str] = field(default_factory=dict)  # sample pk -> keyed hash of its subject
    requests: dict[str, str | None] = field(default_factory=dict)  # request id -> keyed hash (or None)
    target_ids: list[str] = field(default_factory=list)
    # Jobs of the model whose metrics still name samples and subjects (written before audits were stored
    # committed): their per-sample evidence is committed now.
    jobs_with_plain_ids: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return json.dumps({"format": RECORD_FORMAT, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PurgeRecord:
        content = json.loads(data)
        if content.pop("format", None) != RECORD_FORMAT:
            raise ValueError("not a purge record of this version")
        return cls(**content)

    @property
    def name(self) -> str:
        """Its ledger name: ordered by time, unique by job."""
        return f"{self.created_at.replace(':', '').replace('-', '')}-{self.job_id}.json"

    def summary(self) -> dict[str, Any]:
        """What the request's answer, report and trail say was purged (digests, sizes, when)."""
        return {
            "checkpoints": [v for v in self.versions],
            "objects": [{k: o[k] for k in ("sha256", "size", "kind", "reason")} for o in self.objects],
            "kept": self.kept,
            "dataset_rows_purged": len(self.purged_samples),
            "inputs_deleted": len(self.inputs),
            "reference_sets": [{k: v for k, v in r.items() if k != "new"} for r in self.reference_sets],
            "subjects_pseudonymised": len(self.subjects),
        }


# ---------------------------------------------------------------------------------------------- scheduling


def queue(
    session: Session, model_id: str, ready_at: datetime | None = None, due_at: datetime | None = None
) -> tuple[Job, bool]:
    """The model's queued purge job, made ready no later than ``ready_at`` (default: now) and due no later
    than ``due_at``, or a new one; the second value says whether it is new."""
    ready_at = ready_at or utcnow()
    job = session.scalars(
        select(Job).where(Job.model_id == model_id, Job.kind == PURGE_KIND, Job.state == "queued")
    ).first()
    if job is not None:
        job.ready_at = min(job.ready_at or ready_at, ready_at)
        job.due_at = min(job.due_at, due_at) if job.due_at is not None and due_at is not None else job.due_at
        return job, False
    job = Job(
        kind=PURGE_KIND, model_id=model_id, state="queued", method=PURGE_KIND, config={},
        batch_open=False, sample_count=0, ready_at=ready_at, due_at=due_at,
    )  # fmt: skip
    jobs_repository.add(session, job)
    session.flush()
    return job, True


def schedule(session: Session, settings: Settings, target: ErasureTarget) -> Job:
    """Put a completed target into its model's queued purge job (a new one if none): ready after the grace
    window, never past the earliest due date the job holds. The caller dispatches the job once committed."""
    ready = min(utcnow() + timedelta(seconds=settings.purge_after_s), target.due_at)
    job, _new = queue(session, target.model_id, ready, target.due_at)
    job.sample_count += target.pending_count
    target.purge_job_id = job.id
    session.flush()
    return job


def _targets_to_purge(session: Session, model_id: str, job_id: str) -> list[ErasureTarget]:
    """The job's targets, and the model's completed targets whose purge job failed (a purge is idempotent:
    the next one of the model takes them over)."""
    failed = select(Job.id).where(Job.kind == PURGE_KIND, Job.state.in_(("failed", "canceled")))
    adopted = (ErasureTarget.state == "completed") & ErasureTarget.purge_job_id.in_(failed)
    return list(
        session.scalars(
            select(ErasureTarget).where(
                ErasureTarget.model_id == model_id,
                ErasureTarget.purged_at.is_(None),
                (ErasureTarget.purge_job_id == job_id) | adopted,
            )
        )
    )


def retry_failed(session: Session, settings: Settings, job: Job) -> Job | None:
    """A purge job failed: its targets' requests must not wait on it for ever. A new purge job of the model is
    queued (after ``purge_retry_s``), which takes them over; None when one is already queued."""
    ready = utcnow() + timedelta(seconds=settings.purge_retry_s)
    retry, new = queue(session, job.model_id, ready, job.due_at)
    return retry if new else None


def superseded_sets(session: Session, model_id: str) -> int:
    """How many of the model's reference sets, other than its newest, still have their blob."""
    live = session.scalar(
        select(func.count())
        .select_from(AuditReferenceSet)
        .where(AuditReferenceSet.model_id == model_id, AuditReferenceSet.purged_at.is_(None))
    )
    return max(0, int(live or 0) - 1)


def refresh_references_if_due(session: Session, settings: Settings, model_id: str) -> Job | None:
    """A build of the model's reference set when the share of its columns purged since it was built, or its
    age, says it no longer describes the model's training data; None when not due (or one is pending)."""
    from service.audit import service as audit_service  # audit reads the models this module purges

    current = audit_service.current_set(session, model_id)
    model = models_repository.get_model(session, model_id)
    if current is None or model is None:
        return None
    built_on = max(1, int(current.summary.get("train_samples", 0)))
    share = int(current.summary.get("columns_purged", 0)) / built_on
    age_days = (utcnow() - current.created_at).total_seconds() / 86400
    max_age = settings.audit_references_max_age_days
    if share < settings.audit_references_refresh_share and not (max_age and age_days >= max_age):
        return None
    job, new = audit_service.request_build(session, settings, model, current.references)
    return job if new else None


def awaiting_purge(targets: Iterable[ErasureTarget]) -> bool:
    """A completed target whose copies are not yet purged: its request is not completed yet."""
    return any(t.state == "completed" and t.purge_job_id is not None and t.purged_at is None for t in targets)


# -------------------------------------------------------------------------------------------------- planning


def _ancestry(versions: Sequence[ModelVersion]) -> dict[str, set[str]]:
    """Each version's id -> itself and its ancestors."""
    parent = {v.id: v.parent_id for v in versions}
    lineage: dict[str, set[str]] = {}
    for version in versions:
        chain: set[str] = set()
        node: str | None = version.id
        while node is not None and node not in chain:
            chain.add(node)
            node = parent.get(node)
        lineage[version.id] = chain
    return lineage


def versions_holding_erased(session: Session, model_id: str) -> list[ModelVersion]:
    """The model's live versions (not purged) that still hold a sample some request erased."""
    versions = list(models_repository.list_versions(session, model_id))
    erasing = set(
        session.scalars(
            select(ErasedSample.version_id)
            .where(ErasedSample.model_id == model_id, ErasedSample.request_id.is_not(None))
            .distinct()
        )
    )
    lineage = _ancestry(versions)
    return [v for v in versions if v.status != "purged" and not erasing <= lineage[v.id]]


def _rows_erased_by_every_model(session: Session, dataset_id: str) -> list[tuple[int, int]]:
    """(pk, row) of train samples some request erased and every model of the dataset has erased, whose row
    is still in the array."""
    models = (
        session.scalar(select(func.count()).select_from(Model).where(Model.dataset_id == dataset_id)) or 0
    )
    by_request = (
        select(ErasedSample.sample_pk)
        .where(ErasedSample.request_id.is_not(None))
        .distinct()
        .scalar_subquery()
    )
    query = (
        select(Sample.id, Sample.row)
        .join(ErasedSample, ErasedSample.sample_pk == Sample.id)
        .where(Sample.dataset_id == dataset_id, Sample.purged_at.is_(None), Sample.id.in_(by_request))
        .group_by(Sample.id, Sample.row)
        .having(func.count(ErasedSample.model_id) >= models)
        .order_by(Sample.row)
    )
    return [(int(pk), int(row)) for pk, row in session.execute(query)]


@dataclass(frozen=True)
class PurgePlan:
    """What the worker must do before the record can be written: rewrite the current reference set without
    ``erased_rows`` and the array without ``array_rows``."""

    record: PurgeRecord
    reference_set: ObjectRef | None  # the current set's blob, to rewrite without the model's erased rows
    reference_set_id: str | None
    erased_rows: list[int]  # rows of the samples this model erased (by request)
    array: ObjectRef | None  # the dataset's array, to rewrite without array_rows
    array_rows: list[int]


def plan(session: Session, settings: Settings, key: bytes, job_id: str, model_id: str) -> PurgePlan:
    """Everything the purge job of ``model_id`` must delete, rewrite and pseudonymise, read now."""
    model = models_repository.get_model(session, model_id)
    assert model is not None  # the job's foreign key
    dataset = session.get(Dataset, model.dataset_id)
    assert dataset is not None
    record = PurgeRecord(
        job_id=job_id, model_id=model_id, dataset_id=dataset.id, created_at=utcnow().isoformat()
    )
    doomed = versions_holding_erased(session, model_id)
    doomed_ids = {v.id for v in doomed}
    # Digests of versions (of any model) that hold no erased sample: content-addressed objects they share
    # with a doomed version stay.
    live_digests = set(
        session.scalars(
            select(ModelVersion.checkpoint_sha256).where(
                ModelVersion.status != "purged", ModelVersion.id.not_in(doomed_ids) if doomed_ids else true()
            )
        )
    )
    for version in doomed:
        reason = f"version {version.number} ({version.status}) holds samples erased since"
        record.versions.append({"id": version.id, "number": version.number, "status": version.status,
                                "sha256": version.checkpoint_sha256, "size": version.checkpoint_size,
                                "reason": reason})  # fmt: skip
        _doom_object(record, live_digests, "checkpoint", version.checkpoint_sha256, version.checkpoint_size,
                     version.storage_uri, f"checkpoint of version {version.number}")  # fmt: skip
    # Checkpoints of jobs that ended without a version (failed, canceled) on a base that held erased samples.
    purged_ids = doomed_ids | set(
        session.scalars(select(ModelVersion.id).where(ModelVersion.model_id == model_id,
                                                       ModelVersion.status == "purged"))
    )  # fmt: skip
    for job in session.scalars(
        select(Job).where(Job.model_id == model_id, Job.kind == "unlearn", Job.state.in_(TERMINAL_STATES))
    ):
        stored = (job.metrics or {}).get("checkpoint")
        if stored and job.base_version_id in purged_ids and stored["sha256"] not in live_digests:
            _doom_object(record, live_digests, "checkpoint", stored["sha256"], int(stored["size"]),
                         stored["uri"], f"unregistered checkpoint of job {job.id}")  # fmt: skip
    # Reference sets: superseded ones go; the current one loses the erased samples' columns (the worker).
    sets = list(
        session.scalars(
            select(AuditReferenceSet)
            .where(AuditReferenceSet.model_id == model_id, AuditReferenceSet.purged_at.is_(None))
            .order_by(AuditReferenceSet.created_at.desc())
        )
    )
    current = sets[0] if sets else None
    for old in sets[1:]:
        record.reference_sets.append({"id": old.id, "new": None, "reason": "superseded"})
        _doom_object(record, live_digests, "reference_set", old.checkpoint_sha256, old.size, old.storage_uri,
                     "superseded reference set")  # fmt: skip
    erased = session.execute(
        select(Sample.id, Sample.row, Sample.subject_id)
        .join(ErasedSample, ErasedSample.sample_pk == Sample.id)
        .where(ErasedSample.model_id == model_id, ErasedSample.request_id.is_not(None))
    ).all()
    subjects = {subject for _pk, _row, subject in erased if subject}
    # Every request that named one of those subjects (earlier rejected attempts too) keeps only the hash.
    named = select(DeletionRequest.id, DeletionRequest.subject_id).where(
        DeletionRequest.dataset_id == dataset.id, DeletionRequest.subject_id.in_(subjects)
    )
    for request_id, subject in session.execute(named):
        record.requests[request_id] = subject_hash(key, dataset.id, str(subject))
    record.subjects = {
        str(pk): subject_hash(key, dataset.id, subject) for pk, _row, subject in erased if subject
    }
    array_rows = _rows_erased_by_every_model(session, dataset.id)
    purgeable = {pk for pk, _row in array_rows}
    held_elsewhere = sum(1 for pk, _row, _subject in erased if pk not in purgeable)
    if held_elsewhere:  # a model the requests did not name still holds them: not this erasure's copies
        reason = ("other models of the dataset still hold these samples (not asked to erase them): the rows "
                  "stay in the dataset array until they do")  # fmt: skip
        record.kept.append({"kind": "dataset_rows", "count": held_elsewhere, "reason": reason})
    array = None
    if array_rows:
        array = ObjectRef(_digest_of(dataset.array_uri), 0, dataset.array_uri)
        record.purged_samples = [pk for pk, _row in array_rows]
        if dataset.array_source is not None:
            record.inputs.append(dataset.array_source)
    for target in _targets_to_purge(session, model_id, job_id):
        record.target_ids.append(target.id)
        request = session.get(DeletionRequest, target.request_id)
        assert request is not None
        hashed = (
            subject_hash(key, dataset.id, request.subject_id) if request.subject_id else request.subject_hash
        )
        record.requests[request.id] = hashed
    for job in session.scalars(select(Job).where(Job.model_id == model_id, Job.kind == "unlearn")):
        audits = (job.metrics or {}).get("audits") or {}
        if any(not audit.get("committed") for audit in audits.values()):
            record.jobs_with_plain_ids.append(job.id)
    return PurgePlan(
        record=record,
        reference_set=ObjectRef(current.checkpoint_sha256, current.size, current.storage_uri)
        if current
        else None,
        reference_set_id=current.id if current else None,
        erased_rows=sorted(int(row) for _pk, row, _subject in erased),
        array=array,
        array_rows=[row for _pk, row in array_rows],
    )


def _digest_of(uri: str) -> str:
    return uri.rsplit("/", 2)[-2] + uri.rsplit("/", 1)[-1] if "sha256/" in uri else ""


def _doom_object(
    record: PurgeRecord,
    live: set[str],
    kind: str,
    sha256: str,
    size: int,
    uri: str,
    reason: str,
) -> None:
    if sha256 in live:  # the same bytes back a version that holds no erased sample of this model
        # Not naming the other model: it may be another tenant's.
        reason = "the same bytes are a live version of another model, which holds no erased sample"
        record.kept.append({"sha256": sha256, "kind": kind, "reason": reason})
        return
    if all(o["sha256"] != sha256 for o in record.objects):
        record.objects.append({"sha256": sha256, "size": size, "uri": uri, "kind": kind, "reason": reason})


def add_rewritten_array(record: PurgeRecord, old: ObjectRef, new: ObjectRef, rows: list[int]) -> None:
    record.array = {"old": old.uri, "new": asdict(new), "rows": len(rows)}
    reason = "dataset array generation with erased rows"
    _doom_object(record, set(), "dataset_array", old.sha256, old.size, old.uri, reason)


def add_rewritten_reference_set(
    record: PurgeRecord, set_id: str, old: ObjectRef, new: ObjectRef, columns: int
) -> None:
    record.reference_sets.append({"id": set_id, "new": asdict(new), "columns_removed": columns,
                                  "reason": "erased samples' columns removed"})  # fmt: skip
    reason = "reference set with erased columns"
    _doom_object(record, set(), "reference_set", old.sha256, old.size, old.uri, reason)


# ---------------------------------------------------------------------------------------------- applying


def apply(session: Session, record: PurgeRecord, actor: str) -> list[str]:
    """Make the database say what ``record`` says (idempotent: a resumed purge and a replay after a restore
    both call it). Returns warnings (what the database could not be made to say)."""
    now = utcnow()
    warnings: list[str] = []
    for entry in record.versions:
        version = models_repository.get_version(session, entry["id"])
        if version is None:
            warnings.append(f"version {entry['id']} is not in this database")
            continue
        if version.status == "purged":
            continue
        if version.status == "active":  # a restore from before the erasure registered: its bytes are gone
            warnings.append(
                f"version {version.number} of model {version.model_id} was active here; it is "
                "purged now and the model has no active version until an erasure re-runs"
            )
        version.status, version.purged_at, version.purge_reason = "purged", now, entry["reason"]
    for obj in record.objects:
        if session.get(PurgedObject, obj["sha256"]) is None:
            session.add(
                PurgedObject(
                    sha256=obj["sha256"],
                    kind=obj["kind"],
                    size=obj["size"],
                    purged_at=now,
                    job_id=_job_or_none(session, record.job_id),
                    reason=obj["reason"],
                )
            )
    for entry in record.reference_sets:
        reference_set = session.get(AuditReferenceSet, entry["id"])
        if reference_set is None:
            continue
        new = entry["new"]
        if new is None:
            reference_set.purged_at = reference_set.purged_at or now
        elif reference_set.checkpoint_sha256 != new["sha256"]:
            reference_set.checkpoint_sha256, reference_set.size = new["sha256"], new["size"]
            reference_set.storage_uri = new["uri"]
            purged = int(reference_set.summary.get("columns_purged", 0)) + int(entry["columns_removed"])
            reference_set.summary = {**reference_set.summary, "columns_purged": purged}
    if record.array is not None:
        dataset = session.get(Dataset, record.dataset_id, with_for_update=True)
        if dataset is not None:
            dataset.array_uri = record.array["new"]["uri"]
            dataset.array_source = None
    if record.purged_samples:
        session.execute(
            update(Sample).where(Sample.id.in_(record.purged_samples), Sample.purged_at.is_(None))
            .values(purged_at=now, label=None)
        )  # fmt: skip
    for pk, hashed in record.subjects.items():
        session.execute(
            update(Sample).where(Sample.id == int(pk)).values(subject_id=None, subject_hash=hashed)
        )
    for request_id, request_hash in record.requests.items():
        session.execute(
            update(DeletionRequest).where(DeletionRequest.id == request_id)
            .values(subject_id=None, subject_hash=request_hash)
        )  # fmt: skip
    _commit_job_evidence(session, record.jobs_with_plain_ids)
    job_id = _job_or_none(session, record.job_id)
    if job_id is not None:  # a target whose earlier purge job failed is this one's now
        session.execute(
            update(ErasureTarget).where(ErasureTarget.id.in_(record.target_ids)).values(purge_job_id=job_id)
        )
    if record.requests:
        # Reports generated before salts were discarded kept theirs beside the ids: it goes.
        session.execute(
            update(ErasureReport).where(ErasureReport.request_id.in_(list(record.requests)))
            .values(commitment_salt=None)
        )  # fmt: skip
        session.execute(
            delete(IdempotencyRecord).where(IdempotencyRecord.resource_id.in_(list(record.requests)))
        )
    session.flush()
    return warnings


def _commit_job_evidence(session: Session, job_ids: Sequence[str]) -> None:
    """Replace the sample and subject ids in these jobs' audits by commitments under a salt nobody keeps."""
    from service.reports import commitment  # reports read purge records: imported here, not at the top
    from service.reports.builder import commit_audit

    for job_id in job_ids:
        job = session.get(Job, job_id)
        metrics = (job.metrics if job is not None else None) or {}
        if job is None or not metrics.get("audits"):
            continue
        salt = commitment.new_salt()
        audits = {
            request_id: audit if audit.get("committed") else commit_audit(audit, salt)
            for request_id, audit in metrics["audits"].items()
        }
        job.metrics = {**metrics, "audits": audits}


def _job_or_none(session: Session, job_id: str) -> str | None:
    return job_id if session.get(Job, job_id) is not None else None  # a replay may predate the job


def finish_targets(session: Session, record: PurgeRecord, actor: str) -> list[DeletionRequest]:
    """The record's targets are purged: trail event each; returns their requests (to settle)."""
    from service.erasures import service as erasures  # erasures settles requests and schedules purges

    now = utcnow()
    summary = record.summary()
    requests: list[DeletionRequest] = []
    for target_id in record.target_ids:
        target = session.get(ErasureTarget, target_id)
        if target is None or target.purged_at is not None:
            continue
        target.purged_at = now
        session.flush()
        trail.append(
            session, "erasure.purged", actor=actor, subject_type="erasure", subject_id=target.id,
            request_id=target.request_id,
            data={"model_id": target.model_id, "job_id": record.job_id, "ledger_record": record.name,
                  "checkpoints": [{"number": v["number"], "sha256": v["sha256"]} for v in record.versions],
                  "objects_deleted": len(summary["objects"]),
                  "dataset_rows_purged": summary["dataset_rows_purged"]},
        )  # fmt: skip
        request = session.get(DeletionRequest, target.request_id)
        if request is not None:
            requests.append(request)
    for request in requests:
        erasures.settle_request_if_done(session, request, now, actor)
    return requests


def delete_objects(store: ObjectStore, settings: Settings, record: PurgeRecord) -> list[str]:
    """Delete what the record lists (idempotent); returns what could not be deleted from here."""
    warnings: list[str] = []
    for obj in record.objects:
        store.delete(obj["uri"])
    for source in record.inputs:
        if source.startswith(INPUT_SOURCE):
            store.delete_input(source.removeprefix(INPUT_SOURCE))
            continue
        path = Path(source.removeprefix(DATA_SOURCE))
        root = Path(settings.data_dir).resolve()
        if path.is_relative_to(root) and path.exists():
            path.unlink()
        elif path.exists() or not root.exists():
            warnings.append(
                f"input {source} is not in this worker's data directory: delete it on the API host"
            )
    return warnings


def replay(session_factory: sessionmaker[Session], store: ObjectStore, settings: Settings) -> dict[str, Any]:
    """Re-apply every purge the erasure ledger lists, oldest first (``lethe purge replay``): after a database
    restore, the restored rows are made to say what the purges did, and whatever the restore brought back
    into the store (versioned buckets, a store backup) is deleted again. Idempotent."""
    names = store.list_records()
    warnings: list[str] = []
    for name in names:
        record = PurgeRecord.from_bytes(store.read_record(name))
        with session_factory.begin() as session:
            warnings += apply(session, record, "replay")
        warnings += delete_objects(store, settings, record)
        with session_factory.begin() as session:
            finish_targets(session, record, "replay")
    return {"records": len(names), "warnings": warnings}


# ---------------------------------------------------------------------------------------------- reading


def is_purged(session: Session, sha256: str) -> bool:
    return session.get(PurgedObject, sha256) is not None


def purged_sample_count(session: Session, dataset_id: str, sample_ids: Sequence[str] | None) -> int:
    """How many of these samples (None: every train sample) had their rows purged from the array."""
    query = (
        select(func.count())
        .select_from(Sample)
        .where(Sample.dataset_id == dataset_id, Sample.purged_at.is_not(None))
    )
    if sample_ids is not None:
        query = query.where(Sample.sample_id.in_(list(sample_ids)))
    return int(session.scalar(query) or 0)


def unpurged_train_sample_ids(session: Session, dataset_id: str) -> list[str] | None:
    """The dataset's train samples whose rows are still in its array; None when no row was ever purged."""
    if not purged_sample_count(session, dataset_id, None):
        return None
    return list(
        session.scalars(
            select(Sample.sample_id).where(
                Sample.dataset_id == dataset_id, Sample.split == "train", Sample.purged_at.is_(None)
            )
        )
    )


def purged_among(session: Session, sha256s: Sequence[str]) -> list[str]:
    """Which of these digests were purged (a worker's cache check)."""
    if not sha256s:
        return []
    return list(session.scalars(select(PurgedObject.sha256).where(PurgedObject.sha256.in_(list(sha256s)))))


def evict_purged(store: ObjectStore, session_factory: sessionmaker[Session]) -> list[str]:
    """Drop from this worker's cache every object purged anywhere (a check against the registry): run before
    each job and by the sweeper, so no worker reads a purged blob from its disk."""
    if not isinstance(store, CachedStore):
        return []
    cached = store.cached_digests()
    with session_factory() as session:
        purged = purged_among(session, cached)
    return store.evict(purged)


def purge_view(session: Session, target: ErasureTarget) -> dict[str, Any] | None:
    """A target's purge as the request's answer shows it: scheduled (not before when), or done (what went)."""
    if target.purge_job_id is None:
        return None
    job = session.get(Job, target.purge_job_id)
    if job is None:
        return None
    done = target.purged_at is not None
    state = "running" if job.state == "running" else "failed" if job.state == "failed" else "scheduled"
    return {
        "state": "done" if done else state,
        "job_id": job.id,
        "not_before": _iso(job.ready_at),
        "purged_at": _iso(target.purged_at),
        "record": (job.metrics or {}).get("purge") if done else None,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
