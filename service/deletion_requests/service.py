"""Deletion requests: validation and creation (with their per-model erasure targets, queued into jobs).

Never commits: the HTTP route commits the request and its jobs before dispatching them; workers settle the
targets (``service.erasures``), and a request settles with its last target.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from service.clients.service import Principal
from service.core.clock import utcnow
from service.core.database import Base, new_id
from service.core.problems import InvalidInput, NotFound, listed_problem
from service.core.settings import Settings
from service.datasets import repository as datasets_repository
from service.datasets.repository import SubjectSample
from service.datasets.tables import Dataset, Sample
from service.deletion_requests import repository
from service.deletion_requests.schemas import DeletionRequestCreate
from service.deletion_requests.tables import DeletionRequest, DeletionRequestSample
from service.erasures import repository as erasures_repository
from service.erasures import service as erasures
from service.erasures.service import Dispatch
from service.erasures.tables import ErasureTarget
from service.jobs import repository as jobs_repository
from service.models import repository as models_repository
from service.models.tables import Model
from service.purges.pseudonyms import pseudonym_key, subject_hash
from service.trail import service as trail
from worker.engine.config import (
    DEFAULT_LABEL_AGNOSTIC_METHOD,
    DEFAULT_METHOD,
    METHODS,
    ConfigError,
    config_to_dict,
    make_config,
)


@dataclass(frozen=True)
class ErasureView:
    target: ErasureTarget
    model_name: str
    result_version: int | None
    job_metrics: dict[str, Any] | None


@dataclass
class Lookups:
    """What the items of one bulk call share, read once: the tenant's models by name (with their dataset)."""

    models: dict[str, Row[Model, Dataset] | None] = field(default_factory=dict)
    # Per dataset: the samples of the call's data subjects, read in one query, by subject id and by keyed
    # hash (a purge keeps only the hash).
    subjects: dict[str, dict[str, list[SubjectSample]]] = field(default_factory=dict)

    def preload(
        self, session: Session, settings: Settings, items: Sequence[DeletionRequestCreate], tenant: str
    ) -> None:
        """Read what the items name in a few queries: their models (with their datasets), then their
        subjects' samples, one query per dataset."""
        names = sorted({item.model for item in items if item.model is not None} - self.models.keys())
        if names:
            rows = session.execute(
                select(Model, Dataset)
                .join(Dataset, Dataset.id == Model.dataset_id)
                .where(Model.tenant == tenant, Model.name.in_(names))
            ).all()
            found = {row[0].name: row for row in rows}
            self.models.update({name: found.get(name) for name in names})
        subjects: dict[str, set[str]] = {}
        for item in items:
            row = self.models.get(item.model) if item.model is not None else None
            dataset_id = row[1].id if row is not None else item.dataset_id
            if item.subject_id is not None and dataset_id is not None:
                subjects.setdefault(dataset_id, set()).add(item.subject_id)
        key = pseudonym_key(settings)
        for dataset_id, ids in subjects.items():
            hashes = [subject_hash(key, dataset_id, subject) for subject in sorted(ids)]
            by_subject = self.subjects.setdefault(dataset_id, {})
            for sample in datasets_repository.samples_of_subjects(session, dataset_id, sorted(ids), hashes):
                for name in {sample.subject_id, sample.subject_hash} - {None}:
                    by_subject.setdefault(str(name), []).append(sample)


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked in full and not yet written: its row, the models it applies to, its samples."""

    request: DeletionRequest
    models: Sequence[Model]
    pks: list[int]
    # Which of the pks its one model erased, when read with them (a request naming a model and a subject).
    erased: set[int] | None = None


@dataclass(frozen=True)
class CreatedRequest:
    request: DeletionRequest
    erasures: list[ErasureView]  # what the answer shows, from the rows just written
    dispatches: list[Dispatch]  # the jobs to hand to the workers once committed; none when settled at once


def create_request(
    session: Session,
    settings: Settings,
    data: DeletionRequestCreate,
    caller: Principal,
    *,
    optimistic: bool = False,
) -> CreatedRequest:
    """Validate a deletion request completely, then add it, its samples and one erasure target per model it
    applies to (the caller's tenant's named model, or every model of its named dataset), each queued into its
    model's open job (:func:`prepare_request`, then :func:`create_requests`). The caller commits, then
    dispatches. ``optimistic``: see ``erasures.open_targets_many`` (for a request on one model; its commit
    may then raise ``PreconditionFailed``: roll back and call again without it)."""
    prepared = prepare_request(session, settings, data, caller)
    optimistic = optimistic and len(prepared.models) == 1
    [created], dispatches = create_requests(
        session, settings, [prepared], caller.actor, optimistic=optimistic
    )
    return CreatedRequest(created.request, created.erasures, dispatches)


def create_requests(
    session: Session,
    settings: Settings,
    batch: Sequence[PreparedRequest],
    actor: str,
    *,
    optimistic: bool = False,
) -> tuple[list[CreatedRequest], list[Dispatch]]:
    """Add prepared requests, with their samples, each opening its targets (``erasures.open_targets_many``),
    in a few statements whatever their number: the requests, their targets and jobs written together.
    Returns them and the jobs to dispatch (each request's own ``dispatches`` are empty). The caller commits,
    then dispatches. ``optimistic``: one request on one model (see ``erasures.open_targets_many``).

    Locks: a single request on one model (the API's hot path) takes no model lock to join its model's open
    job, only that job's row (``erasures.open_targets_many``). Anything larger locks its models first, once,
    in one order, before any job row or the trail's head: it may go on to need a model's lock (no open job
    to join) while holding another job's row, and the claim takes a model's lock, then its job's, then the
    head; taking them the other way round would deadlock."""
    if len(batch) > 1 or any(len(prepared.models) > 1 for prepared in batch):
        for model_id in sorted({model.id for prepared in batch for model in prepared.models}):
            models_repository.lock_model(session, model_id)
    requests = [prepared.request for prepared in batch]
    for request in requests:
        request.id = new_id()
    samples = [{"request_id": p.request.id, "sample_pk": pk} for p in batch for pk in p.pks]
    written_with: list[tuple[type[Base], Sequence[Base | dict[str, Any]]]] = [
        (DeletionRequest, requests),
        (DeletionRequestSample, samples),
    ]
    for prepared in batch:
        _record_created(session, prepared.request, prepared.models, len(prepared.pks), actor)
    opened, dispatches = erasures.open_targets_many(
        session,
        settings,
        [(p.request, p.models, p.pks, p.erased) for p in batch],
        actor,
        written_with=written_with,
        optimistic=optimistic,
    )
    # Each job once, as soon as any of its messages would have it run.
    soonest: dict[str, Dispatch] = {}
    for dispatch in dispatches:
        if dispatch.job_id not in soonest or dispatch.delay_s < soonest[dispatch.job_id].delay_s:
            soonest[dispatch.job_id] = dispatch
    created = [
        CreatedRequest(prepared.request, _new_views(prepared.models, targets), [])
        for prepared, targets in zip(batch, opened, strict=True)
    ]
    return created, list(soonest.values())


def _new_views(models: Sequence[Model], targets: Sequence[ErasureTarget]) -> list[ErasureView]:
    # A new target has no result version, and its job has not run (no metrics): nothing more to read.
    names = {model.id: model.name for model in models}
    return [ErasureView(target, names[target.model_id], None, None) for target in targets]


def prepare_request(
    session: Session,
    settings: Settings,
    data: DeletionRequestCreate,
    caller: Principal,
    lookups: Lookups | None = None,
) -> PreparedRequest:
    """Check a deletion request in full, writing nothing. Names of things that do not exist (model, dataset,
    subject, sample ids) are 404, as their own paths would answer; input the schema refuses, or that the
    state of what it names refuses, is 422. A model that no longer holds any of the samples (erased by
    an earlier request, or never trained on them) completes its target at once; when every model does, the
    request completes without a job.
    """
    if (data.model is None) == (data.dataset_id is None):
        raise InvalidInput("model-or-dataset", "give exactly one of model and dataset_id")
    if data.model is not None:
        if lookups is None:
            found_model = models_repository.model_named(session, caller.tenant, data.model)
        elif data.model in lookups.models:
            found_model = lookups.models[data.model]
        else:
            found_model = lookups.models[data.model] = session.execute(
                select(Model, Dataset)
                .join(Dataset, Dataset.id == Model.dataset_id)
                .where(Model.tenant == caller.tenant, Model.name == data.model)
            ).one_or_none()
        if found_model is None:
            raise NotFound("unknown-model", f"no model named {data.model!r}", field="model", model=data.model)
        model, dataset = found_model
        models: Sequence[Model] = [model]
    else:
        assert data.dataset_id is not None
        found = datasets_repository.get_dataset(session, data.dataset_id)
        if found is None or found.tenant != caller.tenant:
            raise NotFound(
                "unknown-dataset",
                f"no dataset {data.dataset_id!r}",
                field="dataset_id",
                dataset_id=data.dataset_id,
            )
        dataset = found
        models = erasures_repository.models_of_dataset(session, dataset.id)
    method, config = _method_and_config(data, dataset)
    # A request on one model: which of its samples the model erased is read with them.
    erased_by = models[0].id if data.model is not None and lookups is None else None
    samples, erased = _named_samples(session, settings, data, dataset, lookups, erased_by)
    now = utcnow()
    request = DeletionRequest(
        dataset_id=dataset.id,
        model_id=models[0].id if data.model is not None else None,
        # A subject whose samples were all pseudonymised by a purge is kept in the same form from the start.
        subject_id=data.subject_id if any(s.subject_id == data.subject_id for s in samples) else None,
        subject_hash=subject_hash(pseudonym_key(settings), dataset.id, data.subject_id)
        if data.subject_id is not None
        else None,
        reason=data.reason,
        method=method,
        config=config,
        state="processing",
        sample_count=len(samples),
        received_at=now,
        due_at=_due_at(settings, data.due_at, now),
        completed_at=None,
    )
    return PreparedRequest(request, models, [sample.id for sample in samples], erased)


def _record_created(
    session: Session, request: DeletionRequest, models: Sequence[Model], samples: int, actor: str
) -> None:
    trail.append(
        session, "request.created", actor=actor, subject_type="request", subject_id=request.id,
        request_id=request.id,
        data={"scope": "model" if request.model_id else "dataset", "dataset_id": request.dataset_id,
              "models": [model.name for model in models], "method": request.method, "samples": samples,
              "due_at": request.due_at.isoformat(), "origin_request_id": request.origin_request_id},
    )  # fmt: skip


def _due_at(settings: Settings, requested: datetime | None, now: datetime) -> datetime:
    """The legal deadline: ``gdpr_due_days`` after receipt, or an earlier one the client gives (a request
    its data subject made before it reached Lethe); never a later one."""
    latest = now + timedelta(days=settings.gdpr_due_days)
    if requested is None:
        return latest
    if requested.tzinfo is None:
        raise InvalidInput("invalid-due-date", "due_at needs a time zone", field="due_at")
    if requested > latest:
        raise InvalidInput(
            "invalid-due-date",
            f"due_at may not be later than {settings.gdpr_due_days} days after receipt "
            f"({latest.isoformat()})",
            field="due_at",
            latest=latest.isoformat(),
        )
    return requested


def _method_and_config(data: DeletionRequestCreate, dataset: Dataset) -> tuple[str, dict[str, object]]:
    method = data.method or (DEFAULT_METHOD if dataset.labelled else DEFAULT_LABEL_AGNOSTIC_METHOD)
    try:
        config = json.loads(_full_config(method, json.dumps(data.config, sort_keys=True)))
    except ConfigError as exc:
        field = "method" if method not in METHODS else "config"
        raise InvalidInput("invalid-method-config", str(exc), field=field, method=method) from exc
    if METHODS[method].label_aware and not dataset.labelled:
        raise InvalidInput(
            "method-needs-labels",
            f"{method} uses labels but dataset {dataset.name!r} has none; use a label-agnostic method",
            field="method",
            method=method,
            label_agnostic_methods=sorted(name for name, info in METHODS.items() if not info.label_aware),
        )
    return method, config


@functools.lru_cache(maxsize=1024)
def _full_config(method: str, given: str) -> str:
    """The full configuration (defaults included) of ``method`` given ``given`` (JSON), as JSON: checked once
    per process (the methods and their defaults are code), each request getting its own copy."""
    return json.dumps(config_to_dict(make_config(method, json.loads(given))))


def _named_samples(
    session: Session,
    settings: Settings,
    data: DeletionRequestCreate,
    dataset: Dataset,
    lookups: Lookups | None = None,
    erased_by: str | None = None,
) -> tuple[Sequence[SubjectSample | Sample], set[int] | None]:
    """The train samples the request names, checked: known, of this dataset, not audit, not repeated; with
    ``erased_by`` (a model's id), which of a subject's samples that model erased, read with them (else
    None)."""
    if (data.sample_ids is None) == (data.subject_id is None):
        raise InvalidInput("samples-or-subject", "give exactly one of sample_ids and subject_id")
    if data.subject_id is not None:
        hashed = subject_hash(pseudonym_key(settings), dataset.id, data.subject_id)
        preloaded = lookups.subjects.get(dataset.id) if lookups is not None else None
        erased = None
        if preloaded is not None:
            found = {*preloaded.get(data.subject_id, ()), *preloaded.get(hashed, ())}
            subject_samples: Sequence[SubjectSample] = sorted(found, key=lambda s: s.id)
        else:
            subject_samples, erased = datasets_repository.subject_samples(
                session, dataset.id, data.subject_id, hashed, erased_by
            )
        train = [sample for sample in subject_samples if sample.split == "train"]
        if not train:
            raise NotFound(
                "unknown-subject",
                f"subject {data.subject_id!r} has no train samples in dataset {dataset.name!r}",
                field="subject_id",
                subject_id=data.subject_id,
            )
        _check_size(settings, len(train))
        return train, erased
    sample_ids = data.sample_ids or []  # the schema refuses an empty list
    _check_size(settings, len(sample_ids))
    duplicates = sorted(sample_id for sample_id, count in Counter(sample_ids).items() if count > 1)
    if duplicates:
        raise listed_problem("duplicate-sample-ids", "sample ids are repeated", "sample_ids", duplicates)
    samples = datasets_repository.find_samples(session, dataset.id, sample_ids)
    found = {sample.sample_id for sample in samples}
    missing = [sample_id for sample_id in sample_ids if sample_id not in found]
    if missing:
        foreign = datasets_repository.sample_ids_in_other_datasets(session, dataset, missing)
        unknown = [sample_id for sample_id in missing if sample_id not in foreign]
        if unknown:
            raise listed_problem(
                "unknown-samples",
                f"sample ids are unknown to dataset {dataset.name!r}",
                "sample_ids",
                unknown,
                problem=NotFound,
            )
        raise listed_problem(
            "foreign-samples",
            f"sample ids belong to another dataset than the model's ({dataset.name!r})",
            "sample_ids",
            missing,
        )
    audit = [sample.sample_id for sample in samples if sample.split == "audit"]
    if audit:
        raise listed_problem(
            "audit-samples",
            "ids are audit samples: held out, the model never trained on them",
            "sample_ids",
            audit,
        )
    return samples, None


def _check_size(settings: Settings, count: int) -> None:
    if count > settings.max_samples_per_request:
        raise InvalidInput(
            "too-many-samples",
            f"{count} samples exceed the limit of {settings.max_samples_per_request} per request; split it",
            field="sample_ids",
            count=count,
            limit=settings.max_samples_per_request,
        )


def get_request(session: Session, request_id: str, tenant: str) -> DeletionRequest:
    """The tenant's request (another tenant's is as unknown as a missing one)."""
    request = repository.get(session, request_id)
    dataset = datasets_repository.get_dataset(session, request.dataset_id) if request else None
    if request is None or dataset is None or dataset.tenant != tenant:
        raise NotFound(
            "deletion-request-not-found", f"no deletion request {request_id!r}", request_id=request_id
        )
    return request


def erasure_views(session: Session, request: DeletionRequest) -> list[ErasureView]:
    """The request's targets with what a reader needs beside them: model name, version number, job metrics."""
    views = []
    for target in erasures.targets_of_request(session, request.id):
        model = models_repository.get_model(session, target.model_id)
        assert model is not None  # a foreign key
        version = (
            models_repository.get_version(session, target.result_version_id)
            if target.result_version_id
            else None
        )
        job = jobs_repository.get(session, target.job_id) if target.job_id else None
        views.append(
            ErasureView(target, model.name, version.number if version else None, job.metrics if job else None)
        )
    return views


def honour_earlier_requests(
    session: Session,
    settings: Settings,
    model: Model,
    first_version_id: str,
    training_sample_ids: Sequence[str] | None,
) -> tuple[dict[str, Any], list[Dispatch]]:
    """At a model's registration: what its training data holds of erasures requested before it existed.

    Train samples outside a declared ``training_sample_ids`` are recorded as never held (erased since the
    first version). Every dataset-wide request (not canceled) whose samples the model was trained on is
    carried to it as a new model-scoped request with the same samples, method and due date, queued now.
    Returns the model's ``training_data`` notice and the jobs to dispatch.
    """
    now = utcnow()
    train = {
        row.sample_id: row.id for row in datasets_repository.split_rows(session, model.dataset_id, "train")
    }
    never_held: set[int] = set()
    if training_sample_ids is not None:
        unknown = sorted(set(training_sample_ids) - train.keys())
        if unknown:
            raise listed_problem(
                "unknown-training-samples", "ids are not train samples of the model's dataset",
                "training_sample_ids", unknown,
            )  # fmt: skip
        declared = {train[sample_id] for sample_id in training_sample_ids}
        never_held = set(train.values()) - declared
        erasures_repository.add_erased(session, model.id, never_held, first_version_id, None, now)
    included = repository.requested_sample_pks(session, model.dataset_id) - never_held
    carried: list[PreparedRequest] = []
    for origin in repository.list_origin_candidates(session, model.dataset_id):
        pks = [pk for pk in repository.sample_pks(session, origin.id) if pk not in never_held]
        if not pks:
            continue
        request = DeletionRequest(
            dataset_id=model.dataset_id, model_id=model.id, origin_request_id=origin.id,
            subject_id=origin.subject_id, reason=origin.reason, method=origin.method, config=origin.config,
            state="processing", sample_count=len(pks), received_at=now, due_at=origin.due_at,
        )  # fmt: skip
        carried.append(PreparedRequest(request, [model], pks))
    _created, dispatches = create_requests(session, settings, carried, actor="api") if carried else ([], [])
    queued = [prepared.request.id for prepared in carried]
    notice = {
        "declared_training_samples": None if training_sample_ids is None else len(training_sample_ids),
        "erasure_requested_samples_included": len(included),
        "queued_request_ids": queued,
    }
    return notice, dispatches
