"""Stage 6, purge: a ``purge`` job deletes every copy that still holds what its model's completed erasures
erased (what goes, and why, is service.purges; this stage does the bytes).

Crash-safe and idempotent, in this order: the plan is read and the rewritten artifacts stored (the array's new
generation, the reference set without the erased columns); the ledger record is written to the store (the
intent, outside the database) and named in the job's metrics, so a resumed job redoes the same purge; the
database is made to say what the record says; the objects are deleted (every S3 version, and this worker's
cache); then, in one transaction, the job ends and the requests whose copies are all gone complete.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from service.jobs import service as jobs_service
from service.purges import service as purges
from service.purges.pseudonyms import pseudonym_key
from service.purges.service import ObjectRef, PurgeRecord
from service.storage.objects import LOCAL_SCHEME, S3_SCHEME
from worker.audit import ReferenceSet
from worker.pipeline.data import array_file, open_member, read_verified
from worker.pipeline.heartbeat import Heartbeat

if TYPE_CHECKING:
    from worker.pipeline.job import JobRun

log = logging.getLogger(__name__)

_CHUNK_BYTES = 32 << 20  # rows rewritten per block: memory stays bounded whatever the array's size


def purge_job(job: JobRun, heartbeat: Heartbeat) -> str:
    claimed = job.claimed
    job.step = "purge"
    heartbeat.phase = "purging"
    name = claimed.resume.get("ledger_record")
    record = PurgeRecord.from_bytes(job.store.read_record(name)) if name else _prepare(job)
    with job.session_factory.begin() as session:
        warnings = purges.apply(session, record, job.worker_id)
    warnings += purges.delete_objects(job.store, job.settings, record)
    with job.session_factory.begin() as session:
        summary = {**record.summary(), "ledger_record": record.name, "warnings": warnings}
        jobs_service.finish(session, claimed.job_id, "succeeded", worker_id=job.worker_id,
                            metrics={"ledger_record": record.name, "purge": summary})  # fmt: skip
        purges.finish_targets(session, record, job.worker_id)
        refresh = purges.refresh_references_if_due(session, job.settings, claimed.model_id)
    if refresh is not None:  # committed: if the queue is down, the sweeper sends it
        job.dispatcher.dispatch(refresh.id)
    log.info("job %s: purged %d objects (%d checkpoints), %d dataset rows", claimed.job_id,
             len(record.objects), len(record.versions), len(record.purged_samples))  # fmt: skip
    return "succeeded"


def _prepare(job: JobRun) -> PurgeRecord:
    """Plan, store the rewritten artifacts, write the ledger record and name it in the job's metrics."""
    claimed, store = job.claimed, job.store
    key = pseudonym_key(job.settings)
    with job.session_factory() as session:
        plan = purges.plan(session, job.settings, key, claimed.job_id, claimed.model_id)
    record = plan.record
    if plan.reference_set is not None and plan.reference_set_id is not None and plan.erased_rows:
        old = plan.reference_set
        refs = ReferenceSet.from_bytes(read_verified(store, old.uri, old.sha256))
        erased = np.asarray(plan.erased_rows, dtype=np.int64)
        present = int(np.isin(refs.train_rows, erased).sum())
        if present:
            new = store.put(refs.without_train_rows(erased).to_bytes())
            purges.add_rewritten_reference_set(record, plan.reference_set_id, old, _ref(new), present)
    if plan.array is not None and plan.array_rows:
        old = plan.array
        if old.uri.startswith((LOCAL_SCHEME, S3_SCHEME)):
            path = array_file(store, old.uri)
            with tempfile.TemporaryFile(dir=path.parent) as handle:
                rewrite_array(path, np.asarray(plan.array_rows, dtype=np.int64), handle)
                new = store.put_stream(handle)
            old = ObjectRef(old.sha256, path.stat().st_size, old.uri)
            purges.add_rewritten_array(record, old, _ref(new), plan.array_rows)
        else:  # a dataset registered by server path before the store held arrays: not Lethe's copy to rewrite
            record.kept.append({"sha256": "", "kind": "dataset_array", "reason": f"server path {old.uri}"})
    store.put_record(record.name, record.to_bytes())
    with job.session_factory.begin() as session:
        jobs_service.record_metrics(session, claimed.job_id, {"ledger_record": record.name}, job.worker_id)
    return record


def _ref(stored: Any) -> ObjectRef:
    return ObjectRef(stored.sha256, stored.size, stored.uri)


def rewrite_array(path: Path, rows: np.ndarray, out: BinaryIO) -> None:
    """The ``.npz`` at ``path`` written to ``out`` with ``rows`` zeroed in every member that has one entry
    per row (``x``, and labels or ids stored beside it): row numbers stay, the rows' content is gone.
    Written uncompressed (jobs memory-map it) and streamed in blocks of about 32 MB, from a memory map of a
    stored member or the decompressing stream of a compressed one: one block is all it holds."""
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist() if info.filename.endswith(".npy")]
    num_rows = _member_header(path, "x.npy")[0][0]
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as target:
        for name in names:
            shape, dtype = _member_header(path, name)
            per_row = len(shape) > 0 and shape[0] == num_rows
            header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            with target.open(name, "w", force_zip64=True) as member:
                npy_format.write_array_header_2_0(member, header)
                for start, block in _row_blocks(path, name):
                    if per_row:
                        inside = rows[(rows >= start) & (rows < start + len(block))] - start
                        block[inside] = 0
                    member.write(block.data)  # the block's own buffer: no second copy
    out.seek(0)


def _member_header(path: Path, name: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    with zipfile.ZipFile(path) as archive, archive.open(name) as member:
        version = npy_format.read_magic(member)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _fortran_order, dtype = read(member)
    return tuple(shape), dtype


def _row_blocks(path: Path, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, writable C-ordered block of rows) over a member, about ``_CHUNK_BYTES`` at a time."""
    with zipfile.ZipFile(path) as archive:
        compressed = archive.getinfo(name).compress_type != zipfile.ZIP_STORED
    shape, dtype = _member_header(path, name)
    if not shape:  # a scalar
        yield 0, np.array(open_member(path, name), order="C").reshape(1)
        return
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    if not compressed:
        array = open_member(path, name)  # memory-mapped
        for start in range(0, shape[0], step):
            yield start, np.array(array[start : start + step], order="C")
        return
    with zipfile.ZipFile(path) as archive, archive.open(name) as member:
        version = npy_format.read_magic(member)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        _shape, fortran_order, _dtype = read(member)
        if fortran_order:  # column-major: no row can be read before the whole array; rare, read at once
            whole = np.asarray(npy_format.read_array(archive.open(name)), order="C")
            for start in range(0, shape[0], step):
                yield start, np.array(whole[start : start + step], order="C")
            return
        for start in range(0, shape[0], step):
            count = min(step, shape[0] - start)
            data = bytearray(member.read(count * row_bytes))
            yield start, np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))
