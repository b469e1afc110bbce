from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response, status
from sqlalchemy.orm import Session

from service.clients.security import requires
from service.clients.service import Principal
from service.core.pagination import RowCursorQuery
from service.datasets import service
from service.datasets.schemas import (
    DatasetCreate,
    DatasetOut,
    SampleCounts,
    SampleErasure,
    SampleOut,
    SamplePage,
)
from service.datasets.tables import Dataset
from service.dependencies import LimitQuery, SessionDep, SettingsDep, StoreDep, page_size

router = APIRouter(prefix="/datasets", tags=["datasets"])


def _dataset_out(session: Session, dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        array_uri=dataset.array_uri,
        num_rows=dataset.num_rows,
        sample_shape=dataset.sample_shape,
        num_classes=dataset.num_classes,
        labelled=dataset.labelled,
        created_at=dataset.created_at,
        samples=SampleCounts(**service.sample_counts(session, dataset.id)),
    )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def register_dataset(
    body: DatasetCreate,
    caller: Annotated[Principal, requires("datasets:write")],
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    response: Response,
) -> DatasetOut:
    """Register a dataset of the caller's tenant and its samples (bulk). The array is checked by its header,
    then copied into the object store (streamed, content-addressed), where workers read it; the input it
    came from is then deleted (``LETHE_CONSUME_INPUTS``)."""
    dataset = service.register_dataset(session, settings, store, body, caller.tenant)
    session.commit()
    service.consume_input(settings, store, dataset)
    session.commit()
    response.headers["Location"] = f"/datasets/{dataset.id}"
    return _dataset_out(session, dataset)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(
    dataset_id: str, caller: Annotated[Principal, requires("datasets:read")], session: SessionDep
) -> DatasetOut:
    return _dataset_out(session, service.get_dataset(session, dataset_id, caller.tenant))


@router.get("/{dataset_id}/samples", response_model=SamplePage)
def list_samples(
    dataset_id: str,
    caller: Annotated[Principal, requires("datasets:read")],
    session: SessionDep,
    settings: SettingsDep,
    cursor: RowCursorQuery = None,
    limit: LimitQuery = None,
) -> SamplePage:
    service.get_dataset(session, dataset_id, caller.tenant)
    page = service.list_samples(session, dataset_id, cursor, page_size(settings, limit))
    erasures, model_count = service.sample_erasures(session, dataset_id, [sample.id for sample in page.items])
    items = []
    for sample in page.items:
        erased = erasures.get(sample.id, [])
        items.append(
            SampleOut(
                sample_id=sample.sample_id,
                row=sample.row,
                label=sample.label,
                split=sample.split,
                subject_id=None if any(e.request_id for e in erased) else sample.subject_id,
                purged_at=sample.purged_at,
                erased_from=[
                    SampleErasure(
                        model_id=e.model_id,
                        version_id=e.version_id,
                        request_id=e.request_id,
                        erased_at=e.erased_at,
                    )
                    for e in erased
                ],
                erased_from_every_model=model_count > 0 and len(erased) == model_count,
            )
        )
    return SamplePage(items=items, next_cursor=page.next_cursor)
