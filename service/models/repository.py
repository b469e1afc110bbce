"""Queries on models, their versions and the requests each version covers."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Row, bindparam, func, insert, select
from sqlalchemy.orm import Session, load_only

from service.datasets.tables import Dataset
from service.models.tables import Model, ModelVersion, model_version_requests


def add(session: Session, instance: Model | ModelVersion) -> None:
    session.add(instance)
    session.flush()


def get_model(session: Session, model_id: str) -> Model | None:
    return session.get(Model, model_id)


def get_model_by_name(session: Session, tenant: str, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.tenant == tenant, Model.name == name))


_LOCKED = "lethe.locked_models"  # Session.info: (the transaction, the model ids it has locked)


def lock_model(session: Session, model_id: str) -> Model | None:
    """Take the model's row lock (no-op on SQLite, which serialises writers): the per-model mutex.

    ``FOR NO KEY UPDATE``: exclusive among lockers, but it does not wait on the key-share locks that inserting
    a row referencing the model takes (a deletion request, a job), so those never join a lock cycle. A lock
    the transaction holds already is not asked for again (a request's path, a bulk call's items): no other
    transaction can have changed the row since."""
    if holds_lock(session, model_id):
        return session.get(Model, model_id)
    model = session.get(Model, model_id, with_for_update={"key_share": True}, populate_existing=True)
    _note_locked(session, model_id)
    return model


def holds_lock(session: Session, model_id: str) -> bool:
    """Whether this transaction has taken the model's row lock."""
    held = session.info.get(_LOCKED)
    return held is not None and held[0] is session.get_transaction() and model_id in held[1]


# Every deletion request's first query: built once (the statement and its cache key).
_NAMED = (
    select(Model, Dataset)
    .join(Dataset, Dataset.id == Model.dataset_id)
    .where(Model.tenant == bindparam("tenant"), Model.name == bindparam("name"))
    # What a deletion request reads of them (the model's spec and training notice are JSON it never uses).
    .options(
        load_only(Model.id, Model.tenant, Model.name, Model.dataset_id),
        load_only(Dataset.id, Dataset.tenant, Dataset.name, Dataset.num_classes),
    )
)


def model_named(session: Session, tenant: str, name: str) -> Row[Model, Dataset] | None:
    """The tenant's model by name, with its dataset."""
    return session.execute(_NAMED, {"tenant": tenant, "name": name}).one_or_none()


def _note_locked(session: Session, model_id: str) -> None:
    transaction = session.get_transaction()
    held = session.info.get(_LOCKED)
    if held is None or held[0] is not transaction:
        held = session.info[_LOCKED] = (transaction, set[str]())
    held[1].add(model_id)


def list_models(session: Session, tenant: str, after_name: str | None, limit: int) -> Sequence[Model]:
    query = select(Model).where(Model.tenant == tenant).order_by(Model.name).limit(limit)
    if after_name is not None:
        query = query.where(Model.name > after_name)
    return session.scalars(query).all()


def get_version(session: Session, version_id: str) -> ModelVersion | None:
    return session.get(ModelVersion, version_id)


def get_version_by_number(session: Session, model_id: str, number: int) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.number == number)
    )


def active_version(session: Session, model_id: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.status == "active")
    )


def list_versions(session: Session, model_id: str) -> Sequence[ModelVersion]:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model_id).order_by(ModelVersion.number)
    ).all()


def next_version_number(session: Session, model_id: str) -> int:
    highest = session.scalar(select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model_id))
    return (highest or 0) + 1


def add_covered_requests(session: Session, version_id: str, request_ids: Sequence[str]) -> None:
    if request_ids:
        session.execute(
            insert(model_version_requests),
            [{"version_id": version_id, "request_id": request_id} for request_id in request_ids],
        )


def covered_request_ids(session: Session, version_ids: Sequence[str]) -> dict[str, list[str]]:
    """Request ids per version id (versions covering none are absent)."""
    covered: dict[str, list[str]] = {}
    rows = session.execute(
        select(model_version_requests.c.version_id, model_version_requests.c.request_id)
        .where(model_version_requests.c.version_id.in_(version_ids))
        .order_by(model_version_requests.c.request_id)
    )
    for version_id, request_id in rows:
        covered.setdefault(version_id, []).append(request_id)
    return covered
