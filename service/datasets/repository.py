"""Queries on datasets and samples. Lookups by external id are chunked: SQLite caps bound parameters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from sqlalchemy import Row, bindparam, exists, func, insert, literal, or_, select
from sqlalchemy.orm import Session

from service.core.database import among
from service.datasets.tables import Dataset, Sample
from service.erasures.tables import ErasedSample

_CHUNK = 5_000

SampleRow = Row[int, str, int, int | None, str | None]


class SubjectSample(NamedTuple):
    """What a deletion request reads of its subject's samples (a bulk call reads thousands: plain tuples)."""

    id: int
    subject_id: str | None
    subject_hash: str | None
    split: str


_SUBJECT_COLUMNS = (Sample.id, Sample.subject_id, Sample.subject_hash, Sample.split)
# A new sample's (sample_id, row, label, split, subject_id).
SampleValues = tuple[str, int, int | None, str, str | None]
_COPY_COLUMNS = ("dataset_id", "sample_id", "row", "label", "split", "subject_id")


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def add_dataset(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def dataset_name_taken(session: Session, tenant: str, name: str) -> bool:
    return (
        session.scalar(select(Dataset.id).where(Dataset.tenant == tenant, Dataset.name == name)) is not None
    )


def insert_samples(session: Session, dataset_id: str, samples: Iterable[SampleValues]) -> None:
    """Bulk insert: COPY on Postgres (100,000 rows in well under a second); elsewhere (the SQLite demo) an
    executemany that SQLAlchemy batches into multi-row INSERTs."""
    rows = ((dataset_id, *sample) for sample in samples)
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        columns = ", ".join(_COPY_COLUMNS)
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY samples ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    session.execute(insert(Sample), [dict(zip(_COPY_COLUMNS, row, strict=True)) for row in rows])


def count_samples(session: Session, dataset_id: str) -> dict[str, int]:
    """Registered samples per split."""
    counts = {"train": 0, "audit": 0}
    rows = session.execute(
        select(Sample.split, func.count()).where(Sample.dataset_id == dataset_id).group_by(Sample.split)
    )
    for split, total in rows:
        counts[split] = total
    return counts


def list_samples(session: Session, dataset_id: str, after_pk: int | None, limit: int) -> Sequence[Sample]:
    query = select(Sample).where(Sample.dataset_id == dataset_id).order_by(Sample.id).limit(limit)
    if after_pk is not None:
        query = query.where(Sample.id > after_pk)
    return session.scalars(query).all()


def find_samples(session: Session, dataset_id: str, sample_ids: Sequence[str]) -> list[Sample]:
    found: list[Sample] = []
    for chunk in _chunks(sample_ids):
        found.extend(
            session.scalars(
                select(Sample).where(Sample.dataset_id == dataset_id, Sample.sample_id.in_(chunk))
            )
        )
    return found


def sample_ids_in_other_datasets(session: Session, dataset: Dataset, sample_ids: Sequence[str]) -> set[str]:
    """Which of ``sample_ids`` are samples of the tenant's other datasets."""
    found: set[str] = set()
    for chunk in _chunks(sample_ids):
        found.update(
            session.scalars(
                select(Sample.sample_id)
                .join(Dataset, Dataset.id == Sample.dataset_id)
                .where(
                    Dataset.tenant == dataset.tenant,
                    Sample.dataset_id != dataset.id,
                    Sample.sample_id.in_(chunk),
                )
            )
        )
    return found


def samples_of_subjects(
    session: Session, dataset_id: str, subject_ids: Sequence[str], subject_hashes: Sequence[str]
) -> list[SubjectSample]:
    """:func:`subject_samples` of many subjects at once (a bulk call's), ordered by id."""
    rows = session.execute(
        select(*_SUBJECT_COLUMNS)
        .where(
            Sample.dataset_id == dataset_id,
            or_(
                among(session, Sample.subject_id, subject_ids),
                among(session, Sample.subject_hash, subject_hashes),
            ),
        )
        .order_by(Sample.id)
    )
    return [SubjectSample(*row) for row in rows]


def _subject_samples(erased: Any) -> Any:
    return (
        select(*_SUBJECT_COLUMNS, erased)
        .where(
            Sample.dataset_id == bindparam("dataset_id"),
            or_(
                Sample.subject_id == bindparam("subject_id"),
                Sample.subject_hash == bindparam("subject_hash"),
            ),
        )
        .order_by(Sample.id)
    )


# A deletion request's query of its subject: built once (the statements and their cache keys).
_SUBJECT_SAMPLES = _subject_samples(literal(False))
_SUBJECT_SAMPLES_ERASED_BY = _subject_samples(
    exists().where(ErasedSample.model_id == bindparam("model_id"), ErasedSample.sample_pk == Sample.id)
)


def subject_samples(
    session: Session, dataset_id: str, subject_id: str, subject_hash: str, erased_by: str | None = None
) -> tuple[list[SubjectSample], set[int] | None]:
    """The subject's samples: by its id, or by its keyed hash once a purge pseudonymised them; with
    ``erased_by`` (a model's id), which of them that model erased (pks), read in the same query."""
    parameters = {"dataset_id": dataset_id, "subject_id": subject_id, "subject_hash": subject_hash}
    if erased_by is None:
        rows = session.execute(_SUBJECT_SAMPLES, parameters).all()
    else:
        rows = session.execute(_SUBJECT_SAMPLES_ERASED_BY, {**parameters, "model_id": erased_by}).all()
    samples = [SubjectSample(*row[:4]) for row in rows]
    return samples, {row[0] for row in rows if row[4]} if erased_by is not None else None


def split_rows(session: Session, dataset_id: str, split: str) -> Sequence[SampleRow]:
    """(pk, sample_id, row, label, subject_id) of every sample of a split, by row."""
    return session.execute(
        select(Sample.id, Sample.sample_id, Sample.row, Sample.label, Sample.subject_id)
        .where(Sample.dataset_id == dataset_id, Sample.split == split)
        .order_by(Sample.row)
    ).all()
