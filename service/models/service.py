"""Model registry: models, the lineage of their versions, checkpoint import. Never commits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import IO, Any, BinaryIO

from sqlalchemy.orm import Session

from service.core.pagination import Page, decode_name_key, encode_name_cursor, page_from_rows
from service.core.problems import Conflict, Gone, InvalidInput, NotFound, ServerFault
from service.core.settings import Settings
from service.datasets import repository as datasets_repository
from service.deletion_requests import service as requests_service
from service.erasures import repository as erasures_repository
from service.erasures.service import Dispatch
from service.jobs import repository as jobs_repository
from service.models import repository
from service.models.tables import Model, ModelVersion
from service.purges import service as purges
from service.storage import (
    CorruptObject,
    NotSafetensors,
    ObjectNotFound,
    ObjectStore,
    StoredObject,
    read_safetensors_header,
)
from service.storage.objects import hash_file
from service.trail import service as trail
from worker.engine.config import ConfigError, TrainingConfig, checked_config
from worker.engine.spec import ModelSpec

logger = logging.getLogger(__name__)


class VersionConflict(Conflict):
    """The version a job started from is no longer the active one: its result must not be activated."""


def get_model(session: Session, name: str, tenant: str) -> Model:
    """The tenant's model of that name (another tenant's is as unknown as a missing one)."""
    model = repository.get_model_by_name(session, tenant, name)
    if model is None:
        raise NotFound("model-not-found", f"no model named {name!r}", model=name)
    return model


def register_model(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    *,
    tenant: str,
    name: str,
    dataset_id: str,
    spec: dict[str, Any],
    checkpoint: IO[bytes],
    checkpoint_size: int,
    training_recipe: dict[str, Any] | None = None,
    training_sample_ids: Sequence[str] | None = None,
) -> tuple[Model, ModelVersion, list[Dispatch]]:
    """Register a tenant's model trained on its dataset ``dataset_id``, with its first (active) version
    holding ``checkpoint`` (a seekable file of ``checkpoint_size`` bytes, read in chunks: never held whole).

    Its spec must name one of ``settings.architectures`` (those the workers build) and fit the dataset. It
    was trained on every train sample of the dataset unless ``training_sample_ids`` says which; erasures
    requested dataset-wide before it existed are queued for it (see
    ``deletion_requests.service.honour_earlier_requests``); the caller commits, then dispatches.

    The checkpoint must be a safetensors file (a pickle is refused: loading one runs code). It is stored
    before the rows are committed; if the commit fails, the content-addressed object is merely unreferenced.
    """
    if repository.get_model_by_name(session, tenant, name) is not None:
        raise Conflict("model-name-taken", f"a model named {name!r} exists", model=name)
    dataset = datasets_repository.get_dataset(session, dataset_id)
    if dataset is None or dataset.tenant != tenant:
        raise InvalidInput("unknown-dataset", f"no dataset {dataset_id!r}", dataset_id=dataset_id)
    try:
        model_spec = ModelSpec.from_dict(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput("invalid-spec", f"invalid model spec: {exc}", field="spec") from exc
    architectures = settings.architectures
    if model_spec.architecture not in architectures:
        raise InvalidInput(
            "unknown-architecture",
            f"the workers build no architecture {model_spec.architecture!r}",
            field="spec.architecture",
            architectures=sorted(architectures),
        )
    if list(model_spec.input_shape) != list(dataset.sample_shape):
        raise InvalidInput(
            "spec-dataset-mismatch",
            f"spec input_shape {list(model_spec.input_shape)} != dataset sample shape {dataset.sample_shape}",
            field="spec.input_shape",
        )
    if dataset.num_classes is not None and model_spec.num_classes != dataset.num_classes:
        raise InvalidInput(
            "spec-dataset-mismatch",
            f"spec num_classes {model_spec.num_classes} != dataset num_classes {dataset.num_classes}",
            field="spec.num_classes",
        )
    recipe = None
    if training_recipe is not None:
        try:
            recipe = asdict(checked_config(TrainingConfig, training_recipe, owner="training_recipe"))
        except ConfigError as exc:
            raise InvalidInput("invalid-training-recipe", str(exc), field="training_recipe") from exc
    try:
        read_safetensors_header(checkpoint, checkpoint_size)
    except NotSafetensors as exc:
        raise InvalidInput("invalid-checkpoint", str(exc), field="checkpoint") from exc
    training_sample_ids = _training_samples(session, dataset.id, checkpoint, training_sample_ids)
    stored = store.put_stream(checkpoint)
    model = Model(
        tenant=tenant, name=name, dataset_id=dataset.id, spec=model_spec.to_dict(), training_recipe=recipe
    )
    repository.add(session, model)
    version = register_version(
        session,
        model_id=model.id,
        parent_version_id=None,
        stored=stored,
        method=None,
        config=None,
        metrics_before=None,
        metrics_after=None,
        activate=True,
        rejection_reason=None,
        job_id=None,
        request_ids=(),
    )
    notice, dispatches = requests_service.honour_earlier_requests(
        session, settings, model, version.id, training_sample_ids
    )
    model.training_data = notice
    session.flush()
    return model, version, dispatches


def _training_samples(
    session: Session, dataset_id: str, checkpoint: IO[bytes], training_sample_ids: Sequence[str] | None
) -> Sequence[str] | None:
    """The samples the model was trained on, once erased data is kept out. Erased data cannot come back: not
    the bytes of a purged checkpoint, and not a model declared trained on samples whose rows were purged
    (Lethe could no longer unlearn or audit them: retrain without them). A model that declares nothing was
    trained on the train samples the dataset still holds."""
    checkpoint.seek(0)
    sha256, _size = hash_file(checkpoint)
    checkpoint.seek(0)
    if purges.is_purged(session, sha256):
        raise Conflict(
            "checkpoint-purged", "these checkpoint bytes were purged (a version that held erased samples)",
            sha256=sha256,
        )  # fmt: skip
    if training_sample_ids is None:
        return purges.unpurged_train_sample_ids(session, dataset_id)
    purged = purges.purged_sample_count(session, dataset_id, training_sample_ids)
    if purged:
        raise Conflict(
            "trained-on-purged-samples",
            f"the model is declared trained on {purged} samples erased from every model of the dataset and "
            "purged from it; retrain without them and declare training_sample_ids",
            purged_samples=purged,
        )
    return training_sample_ids


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def list_models(session: Session, tenant: str, cursor: str | None, limit: int) -> Page[Model]:
    after_name = decode_name_key(cursor) if cursor else None
    rows = repository.list_models(session, tenant, after_name, limit + 1)
    return page_from_rows(rows, limit, key_of=lambda model: (model.name,), encode=encode_name_cursor)


def active_version(session: Session, model: Model) -> ModelVersion:
    version = repository.active_version(session, model.id)
    if version is None:  # pragma: no cover - register_model creates the first active version
        raise ServerFault("no-active-version", f"model {model.name!r} has no active version")
    return version


def list_versions(session: Session, model: Model) -> Sequence[ModelVersion]:
    return repository.list_versions(session, model.id)


def covered_request_ids(session: Session, versions: Sequence[ModelVersion]) -> dict[str, list[str]]:
    return repository.covered_request_ids(session, [version.id for version in versions])


def erased_sample_counts(session: Session, model: Model) -> dict[str, int]:
    """Per version of the model: how many train samples it no longer holds (its own erasures and its
    ancestors'; a rejected version holds what its parent holds)."""
    own = erasures_repository.erased_counts_by_version(session, model.id)
    versions = {version.id: version for version in repository.list_versions(session, model.id)}
    counts: dict[str, int] = {}
    for version in sorted(versions.values(), key=lambda v: v.number):
        parent = counts.get(version.parent_id, 0) if version.parent_id else 0
        counts[version.id] = parent + own.get(version.id, 0)
    return counts


def open_checkpoint(store: ObjectStore, version: ModelVersion) -> BinaryIO:
    """The version's checkpoint, hash-verified; a purged version is 410 Gone, a missing or corrupt object a
    server fault (500)."""
    _refuse_tombstone(version)
    try:
        return store.open(version.storage_uri)
    except (ObjectNotFound, CorruptObject) as exc:
        logger.error("checkpoint of version %s unreadable: %s", version.id, exc)
        raise ServerFault(
            "checkpoint-unavailable",
            "the stored checkpoint is missing or corrupt",
            sha256=version.checkpoint_sha256,
        ) from exc


def _refuse_tombstone(version: ModelVersion) -> None:
    if version.status == "purged":
        raise Gone(
            "checkpoint-purged", f"version {version.number} held erased samples; its checkpoint was deleted",
            number=version.number, sha256=version.checkpoint_sha256, purged_at=_iso(version.purged_at),
            reason=version.purge_reason,
        )  # fmt: skip


def activate_version(session: Session, model: Model, number: int, actor: str) -> ModelVersion:
    """Roll the model's active version to version ``number``: an operator's fix, allowed only to a version
    that holds no erased sample (never an ancestor of an erasure: a bad post-erasure version is fixed forward,
    never by bringing the subject back) and while no job of the model runs."""
    version = get_version(session, model, number)
    if repository.lock_model(session, model.id) is None:  # pragma: no cover - the model exists
        raise NotFound("model-not-found", f"no model {model.name!r}", model=model.name)
    _refuse_tombstone(version)
    if version.status == "active":
        raise Conflict("version-already-active", f"version {number} is the active version", number=number)
    if any(v.id == version.id for v in purges.versions_holding_erased(session, model.id)):
        raise Conflict(
            "version-holds-erased-samples",
            f"version {number} still holds samples erased since: it can never be active again",
            number=number,
        )
    if jobs_repository.active_job_id(session, model.id, excluding="") is not None:
        raise Conflict("model-busy", "a job of the model is running; roll back once it has ended")
    current = repository.active_version(session, model.id)
    if current is not None:
        current.status = "superseded"
        session.flush()
    version.status = "active"
    session.flush()
    trail.append(
        session, "model.version_activated", actor=actor, subject_type="model", subject_id=model.id,
        request_id=None,
        data={"number": number, "version_id": version.id, "previous": current.number if current else None},
    )  # fmt: skip
    return version


def get_version(session: Session, model: Model, number: int) -> ModelVersion:
    version = repository.get_version_by_number(session, model.id, number)
    if version is None:
        raise NotFound(
            "version-not-found",
            f"model {model.name!r} has no version {number}",
            model=model.name,
            number=number,
        )
    return version


def register_version(
    session: Session,
    *,
    model_id: str,
    parent_version_id: str | None,
    stored: StoredObject,
    method: str | None,
    config: dict[str, Any] | None,
    metrics_before: dict[str, Any] | None,
    metrics_after: dict[str, Any] | None,
    activate: bool,
    rejection_reason: str | None,
    job_id: str | None,
    request_ids: Sequence[str],
    actor: str = "api",
) -> ModelVersion:
    """Add the next version of ``model_id`` derived from ``parent_version_id``.

    Status: ``active`` when ``activate`` (the parent must still be the active version, or both None for a
    model's first version, else :class:`VersionConflict`; the parent becomes ``superseded``), ``rejected``
    when a ``rejection_reason`` is given, ``candidate`` otherwise. Holds the model's row lock until the caller
    commits, so version numbers and the single active version stay consistent under concurrent jobs.
    """
    if activate and rejection_reason is not None:
        raise ValueError("a rejected version cannot be activated")
    if repository.lock_model(session, model_id) is None:
        raise NotFound("model-not-found", f"no model {model_id!r}", model_id=model_id)
    parent = repository.get_version(session, parent_version_id) if parent_version_id is not None else None
    if parent_version_id is not None and (parent is None or parent.model_id != model_id):
        raise NotFound("version-not-found", f"model {model_id!r} has no version {parent_version_id!r}")
    if activate:
        current = repository.active_version(session, model_id)
        current_id = current.id if current is not None else None
        if current_id != parent_version_id:
            raise VersionConflict(
                "stale-parent-version",
                f"version {parent_version_id!r} is not the active version of model {model_id!r}",
                active_version_id=current_id,
            )
        if parent is not None:
            parent.status = "superseded"
            # Flushed first: the partial unique index allows one active version at any instant.
            session.flush()
    version = ModelVersion(
        model_id=model_id,
        number=repository.next_version_number(session, model_id),
        parent_id=parent_version_id,
        checkpoint_sha256=stored.sha256,
        checkpoint_size=stored.size,
        storage_uri=stored.uri,
        method=method,
        config=config,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        status="active" if activate else ("rejected" if rejection_reason is not None else "candidate"),
        rejection_reason=rejection_reason,
        created_by_job_id=job_id,
    )
    repository.add(session, version)
    repository.add_covered_requests(session, version.id, request_ids)
    request_id = request_ids[0] if len(request_ids) == 1 else None
    if activate and parent is not None:
        trail.append(
            session, "version.superseded", actor=actor, subject_type="version", subject_id=parent.id,
            request_id=request_id, data={"model_id": model_id, "number": parent.number, "by": version.id},
        )  # fmt: skip
    trail.append(
        session, f"version.{version.status}", actor=actor, subject_type="version", subject_id=version.id,
        request_id=request_id,
        data={"model_id": model_id, "number": version.number, "parent_id": parent_version_id,
              "checkpoint_sha256": version.checkpoint_sha256, "method": method, "job_id": job_id,
              "covers_requests": list(request_ids), "rejection_reason": rejection_reason},
    )  # fmt: skip
    return version
