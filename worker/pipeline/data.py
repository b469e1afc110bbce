"""What a job reads: checkpoints (hash-verified) and the dataset's rows as tensors (memory-mapped)."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.lib import format as npy_format
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from service.core.problems import ProblemError
from service.datasets import service as datasets_service
from service.datasets.service import SampleSet
from service.storage import CorruptObject, ObjectNotFound, ObjectStore
from service.storage.objects import LOCAL_SCHEME, S3_SCHEME
from worker.checkpoints import CheckpointMismatch, load_state_dict
from worker.engine.config import ConfigError, make_config
from worker.engine.data import TensorSplit
from worker.engine.spec import ModelSpec
from worker.pipeline.errors import JobFailed

SessionFactory = sessionmaker[Session]


@dataclass(frozen=True)
class JobSets:
    forget: TensorSplit
    remaining: TensorSplit
    remaining_sample: TensorSplit  # what evaluation reads: the remaining set can be the whole dataset
    audit: TensorSplit
    forget_sample_ids: tuple[str, ...]
    forget_subject_ids: tuple[str | None, ...]

    @property
    def forget_rows(self) -> np.ndarray:
        return rows_of(self.forget)

    @property
    def audit_rows(self) -> np.ndarray:
        return rows_of(self.audit)


def rows_of(split: TensorSplit) -> np.ndarray:
    assert split.index is not None  # every split the pipeline loads records its rows
    return split.index.numpy()


def concat(first: TensorSplit, second: TensorSplit) -> TensorSplit:
    def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None or b is None else torch.cat([a, b])

    return TensorSplit(torch.cat([first.x, second.x]), cat(first.y, second.y), cat(first.index, second.index))


def read_verified(store: ObjectStore, uri: str, sha256: str) -> bytes:
    """An object's bytes, checked against the SHA-256 the registry recorded for it."""
    try:
        data = store.read(uri)
    except (ObjectNotFound, CorruptObject) as exc:
        raise JobFailed("checkpoint_integrity", str(exc)) from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise JobFailed("checkpoint_integrity", f"{uri} does not hash to {sha256}, the digest recorded")
    return data


def load_checkpoint(store: ObjectStore, uri: str, sha256: str, spec: ModelSpec) -> nn.Module:
    data = read_verified(store, uri, sha256)
    try:
        return load_state_dict(data, spec)
    except CheckpointMismatch as exc:
        raise JobFailed("checkpoint_integrity", str(exc)) from exc


def load_sets(
    session_factory: SessionFactory,
    store: ObjectStore,
    dataset_id: str,
    model_id: str,
    forget_sample_ids: Sequence[str],
    *,
    eval_remaining_rows: int,
    seed: int,
) -> JobSets:
    """The forget set, the remaining train set (and the seeded sample of it evaluation reads) and the audit
    split of a dataset, as tensors read from its array: memory-mapped from the store's local file (on a
    worker of an S3 store, its cache: fetched once per machine). The array is the dataset's current
    generation, read now: a purge may have replaced the one the job was claimed with."""
    array_uri = "?"
    try:
        with session_factory() as session:
            resolved = datasets_service.resolve_sets(session, dataset_id, model_id, forget_sample_ids)
        array_uri = resolved.array_uri
        x = open_rows(array_file(store, array_uri))
        remaining = tensor_split(x, resolved.remaining)
    except ProblemError as exc:  # unknown samples or dataset
        raise JobFailed("dataset_error", exc.detail) from exc
    except (ObjectNotFound, CorruptObject) as exc:
        raise JobFailed("dataset_integrity", str(exc)) from exc
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise JobFailed("dataset_error", f"{array_uri}: {exc}") from exc
    sample = remaining
    if len(remaining) > eval_remaining_rows:
        rows = torch.randperm(len(remaining), generator=torch.Generator().manual_seed(seed))
        sample = remaining.subset(rows[:eval_remaining_rows].sort().values)
    return JobSets(
        forget=tensor_split(x, resolved.forget),
        remaining=remaining,
        remaining_sample=sample,
        audit=tensor_split(x, resolved.audit),
        forget_sample_ids=resolved.forget.sample_ids,
        forget_subject_ids=resolved.forget.subject_ids,
    )


def spec_of(data: dict[str, Any]) -> ModelSpec:
    try:
        return ModelSpec.from_dict(data)
    except (KeyError, ValueError) as exc:
        raise JobFailed("invalid_model_spec", str(exc)) from exc


def config_of(method: str, overrides: dict[str, Any]) -> Any:
    try:
        return make_config(method, overrides)
    except ConfigError as exc:
        raise JobFailed("invalid_config", str(exc)) from exc


def array_file(store: ObjectStore, array_uri: str) -> Path:
    """The array's local file: the store's (verified), or a server path of a dataset registered before the
    store held arrays."""
    if array_uri.startswith((LOCAL_SCHEME, S3_SCHEME)):
        return store.local_path(array_uri)
    return Path(array_uri)


def open_rows(path: Path) -> np.ndarray:
    """``x`` of a dataset's ``.npz`` (see :func:`open_member`)."""
    return open_member(path, "x.npy")


def open_member(path: Path, name: str) -> np.ndarray:
    """One array of an ``.npz``: memory-mapped when the member is stored uncompressed (``np.savez``), so
    a reader touches only the rows it indexes; read whole from a compressed archive
    (``np.savez_compressed``)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.asarray(npy_format.read_array(member))
        with archive.open(info) as member:
            version = npy_format.read_magic(member)
            read_header = (
                npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(member)
            npy_header_len = member.tell()
    with path.open("rb") as raw:
        # The local file header: 30 fixed bytes, then the name and an extra field whose lengths it gives.
        raw.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
    offset = info.header_offset + 30 + int(name_len) + int(extra_len) + npy_header_len
    order: Literal["C", "F"] = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def tensor_split(x: np.ndarray, samples: SampleSet) -> TensorSplit:
    rows = samples.rows
    labels = None if samples.labels is None else torch.from_numpy(samples.labels)
    return TensorSplit(torch.from_numpy(np.ascontiguousarray(x[rows])), labels, torch.from_numpy(rows))
