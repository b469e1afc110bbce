"""Dataset registration, sample resolution for jobs, and which models erased which samples. Never commits."""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format
from sqlalchemy.orm import Session

from service.core.files import consume_data_file, inside_root, open_data_file
from service.core.pagination import Page, decode_row_key, encode_row_cursor, page_from_rows
from service.core.problems import Conflict, InvalidInput, NotFound, listed_problem
from service.core.settings import Settings
from service.datasets import repository
from service.datasets.schemas import DatasetCreate
from service.datasets.tables import Dataset, Sample
from service.erasures import repository as erasures_repository
from service.erasures.tables import ErasedSample
from service.storage import InvalidInputKey, ObjectNotFound, ObjectStore


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class SampleSet:
    """Samples of one role in a job, ordered by row; ``labels`` is None for a label-free dataset."""

    sample_ids: tuple[str, ...]
    subject_ids: tuple[str | None, ...]
    rows: np.ndarray  # int64 indices into the array file's x
    labels: np.ndarray | None  # int64

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class ResolvedSets:
    forget: SampleSet  # the samples this job unlearns
    remaining: SampleSet  # train samples the model still holds, less this job's
    audit: SampleSet  # the held-out split, never trained on
    array_uri: str  # the dataset's array now (a purge replaces it by a generation without erased rows)


def read_array_header(handle: BinaryIO, field: str = "array_path") -> ArrayHeader:
    """Shape and dtype of ``x`` in an open ``.npz``, reading only the member's npy header, not its data
    (nothing is unpickled: an object array's header says ``object`` and is refused by the caller)."""
    try:
        with zipfile.ZipFile(handle) as archive, archive.open("x.npy") as member:
            version = npy_format.read_magic(member)
            reader = (
                npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            )
            shape, _fortran_order, dtype = reader(member)
    except KeyError as exc:
        raise InvalidInput("invalid-array-file", "the archive has no array 'x'", field=field) from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInput("invalid-array-file", f"not a readable .npz ({exc})", field=field) from exc
    return ArrayHeader(shape=tuple(shape), dtype=dtype)


# Where an array was adopted from (datasets.array_source): a file of the data directory, or an input key.
DATA_SOURCE, INPUT_SOURCE = "data:", "inputs:"


def register_dataset(
    session: Session, settings: Settings, store: ObjectStore, data: DatasetCreate, tenant: str
) -> Dataset:
    """Validate the array (a regular file inside the data root, or an input object of the store) by its
    header and every sample, copy the array into the store (streamed; content-addressed), then insert the
    tenant's dataset and its samples in bulk. Nothing is written when a check fails; a copy whose insert
    then fails is merely an unreferenced object."""
    if (data.array_path is None) == (data.array_object is None):
        raise InvalidInput("array-path-or-object", "give exactly one of array_path and array_object")
    if repository.dataset_name_taken(session, tenant, data.name):
        raise Conflict("dataset-name-taken", f"a dataset named {data.name!r} exists", name=data.name)
    if data.array_path is not None:
        limit = settings.max_array_bytes
        with open_data_file(settings.data_dir, data.array_path, "array_path", limit) as (handle, _size):
            header = _checked_header(handle, "array_path")
            _validate_samples(data, num_rows=header.shape[0])
            stored = store.put_stream(handle)
        source = DATA_SOURCE + str(inside_root(settings.data_dir, data.array_path, "array_path"))
    else:
        assert data.array_object is not None
        key = data.array_object
        try:
            size = store.input_size(key)
        except InvalidInputKey as exc:
            raise InvalidInput("invalid-object-key", str(exc), field="array_object") from exc
        except ObjectNotFound as exc:
            raise InvalidInput(
                "object-not-found", "no such input object in the store", field="array_object"
            ) from exc
        if size > settings.max_array_bytes:
            raise InvalidInput(
                "file-too-large", f"the object is larger than the limit of {settings.max_array_bytes} bytes",
                field="array_object", limit=settings.max_array_bytes,
            )  # fmt: skip
        with store.open_input(key) as handle:
            header = _checked_header(handle, "array_object")
        _validate_samples(data, num_rows=header.shape[0])
        stored = store.adopt_input(key)
        source = INPUT_SOURCE + key
    dataset = repository.add_dataset(
        session,
        Dataset(
            tenant=tenant,
            name=data.name,
            array_uri=stored.uri,
            array_source=source,
            num_rows=header.shape[0],
            sample_shape=list(header.shape[1:]),
            num_classes=data.num_classes,
        ),
    )
    repository.insert_samples(
        session, dataset.id, ((s.sample_id, s.row, s.label, s.split, s.subject_id) for s in data.samples)
    )
    return dataset


def consume_input(settings: Settings, store: ObjectStore, dataset: Dataset) -> None:
    """Once the registration committed: delete the input the array was stored from (``consume_inputs``), and
    forget where it was (the caller commits): nothing is left there for a purge to delete."""
    source = dataset.array_source
    if not settings.consume_inputs or source is None:
        return
    if source.startswith(INPUT_SOURCE):
        store.delete_input(source.removeprefix(INPUT_SOURCE))
    else:
        consume_data_file(settings.data_dir, source.removeprefix(DATA_SOURCE))
    dataset.array_source = None


def _checked_header(handle: BinaryIO, field: str) -> ArrayHeader:
    header = read_array_header(handle, field)
    if header.dtype != np.float32 or len(header.shape) != 4:
        raise InvalidInput(
            "invalid-array-file",
            f"x must be float32 with shape (N, C, H, W); got {header.dtype} {header.shape}",
            field=field,
        )
    return header


def _validate_samples(data: DatasetCreate, num_rows: int) -> None:
    samples = data.samples
    _reject_duplicates("sample_ids", [s.sample_id for s in samples])
    _reject_duplicates("rows", [s.row for s in samples])
    out_of_range = [s.sample_id for s in samples if s.row >= num_rows]
    if out_of_range:
        detail = f"samples' rows are not in the array (it has {num_rows} rows)"
        raise listed_problem("rows-out-of-range", detail, "sample_ids", out_of_range, num_rows=num_rows)
    labelled = [s.label is not None for s in samples]
    if any(labelled) and not all(labelled):
        unlabelled = [s.sample_id for s in samples if s.label is None]
        detail = "samples lack a label: either every sample carries one or none does"
        raise listed_problem("missing-labels", detail, "sample_ids", unlabelled)
    if all(labelled) and data.num_classes is None:
        raise InvalidInput("missing-num-classes", "samples carry labels, so num_classes is required")
    if not any(labelled) and data.num_classes is not None:
        raise InvalidInput("missing-labels", "num_classes is given but no sample carries a label")
    if data.num_classes is not None:
        bad = [s.sample_id for s in samples if s.label is not None and s.label >= data.num_classes]
        if bad:
            detail = f"samples' labels are not in [0, {data.num_classes})"
            raise listed_problem(
                "labels-out-of-range", detail, "sample_ids", bad, num_classes=data.num_classes
            )
    if not any(s.split == "train" for s in samples):
        raise InvalidInput("no-train-samples", "a dataset needs at least one train sample")


def _reject_duplicates(key: str, values: Sequence[str | int]) -> None:
    duplicates = sorted(value for value, count in Counter(values).items() if count > 1)
    if duplicates:
        raise listed_problem(f"duplicate-{key.replace('_', '-')}", f"{key} values repeat", key, duplicates)


def get_dataset(session: Session, dataset_id: str, tenant: str) -> Dataset:
    """The tenant's dataset; another tenant's is as unknown as a missing one."""
    dataset = repository.get_dataset(session, dataset_id)
    if dataset is None or dataset.tenant != tenant:
        raise NotFound("dataset-not-found", f"no dataset {dataset_id!r}", dataset_id=dataset_id)
    return dataset


def sample_counts(session: Session, dataset_id: str) -> dict[str, int]:
    models = len(erasures_repository.models_of_dataset(session, dataset_id))
    return {
        **repository.count_samples(session, dataset_id),
        "models": models,
        "erased_from_every_model": erasures_repository.erased_from_every_model(session, dataset_id, models),
    }


def sample_erasures(
    session: Session, dataset_id: str, sample_pks: Sequence[int]
) -> tuple[dict[int, list[ErasedSample]], int]:
    """Per sample: the models that erased it; and how many models the dataset has."""
    models = len(erasures_repository.models_of_dataset(session, dataset_id))
    return erasures_repository.erasures_of_samples(session, sample_pks), models


def list_samples(session: Session, dataset_id: str, cursor: str | None, limit: int) -> Page[Sample]:
    after_pk = decode_row_key(cursor) if cursor else None
    rows = repository.list_samples(session, dataset_id, after_pk, limit + 1)
    return page_from_rows(rows, limit, key_of=lambda sample: (sample.id,), encode=encode_row_cursor)


def resolve_sets(
    session: Session, dataset_id: str, model_id: str, forget_sample_ids: Sequence[str]
) -> ResolvedSets:
    """Rows (and labels) of a job's forget set, the remaining train set and the audit split.

    The remaining set excludes every sample the model erased so far (or was never trained on) and this job's
    forget set, so successive jobs never train on data an earlier request removed.
    """
    dataset = repository.get_dataset(session, dataset_id)
    if dataset is None:
        raise NotFound("dataset-not-found", f"no dataset {dataset_id!r}", dataset_id=dataset_id)
    forget_ids = set(forget_sample_ids)
    train = repository.split_rows(session, dataset_id, "train")
    forget = [r for r in train if r.sample_id in forget_ids]
    if len(forget) != len(forget_ids):
        missing = sorted(forget_ids - {r.sample_id for r in forget})
        detail = f"ids are not train samples of dataset {dataset_id}"
        raise listed_problem("unknown-samples", detail, "sample_ids", missing)
    erased = erasures_repository.all_erased_pks(session, model_id)
    remaining = [r for r in train if r.sample_id not in forget_ids and r.id not in erased]
    audit = repository.split_rows(session, dataset_id, "audit")
    return ResolvedSets(
        forget=_sample_set(forget, dataset.labelled),
        remaining=_sample_set(remaining, dataset.labelled),
        audit=_sample_set(audit, dataset.labelled),
        array_uri=dataset.array_uri,
    )


def _sample_set(rows: Sequence[repository.SampleRow], labelled: bool) -> SampleSet:
    return SampleSet(
        sample_ids=tuple(r.sample_id for r in rows),
        subject_ids=tuple(r.subject_id for r in rows),
        rows=np.fromiter((r.row for r in rows), dtype=np.int64, count=len(rows)),
        labels=np.fromiter((r.label for r in rows), dtype=np.int64, count=len(rows)) if labelled else None,
    )
