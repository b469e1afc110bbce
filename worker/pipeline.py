"""One unlearning job from claim to registered version: the only worker code that touches the database.

Steps, each ending in its own commit, so that a job whose worker died resumes rather than redoes (its lease
lapses, another worker claims it again) and a crash never leaves half-written state:

1. claim: queued -> running, lease taken (or an abandoned running/evaluating job taken over).
2. load the base version's checkpoint (hash-verified) and the job's samples; unlearn; store the new
   checkpoint (content-addressed, so a retry rewrites the same object); running -> evaluating with the
   checkpoint recorded in the job's metrics. A job claimed again in ``evaluating`` starts here from it.
3. evaluate the base and the new model, apply the audit gate.
4. ONE transaction: register the version (active when the gate passes, else rejected), mark the samples
   forgotten (only when active), finish the job (succeeded | rejected). Nothing of it exists if any part
   fails.

A rejected job closes its deletion request as ``rejected``: the model stays on its previous version, the
samples are not marked forgotten (they are still in the active model), and the request is NOT fulfilled; its
due date keeps running and a new request (another method, or retrain) is needed. The rejected version and its
checkpoint stay in the registry as evidence of the attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.lib import format as npy_format
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from service.core.clock import utcnow
from service.core.problems import ProblemError
from service.core.settings import Settings
from service.datasets import service as datasets_service
from service.datasets.service import SampleSet
from service.jobs import service as jobs_service
from service.jobs.service import ClaimedJob, InvalidTransition
from service.models import service as models_service
from service.storage import CheckpointNotFound, CheckpointStore, CorruptCheckpoint, StoredObject
from worker.checkpoints import CheckpointMismatch, load_state_dict, state_dict_to_bytes
from worker.engine.api import unlearn
from worker.engine.config import ConfigError, config_to_dict, make_config
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.progress import CancellationToken, ProgressEvent, UnlearningCancelled
from worker.engine.runtime import Runtime
from worker.engine.spec import ModelSpec
from worker.engine.training import predict_logits
from worker.evaluation.metrics import accuracy, paper_metrics

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]


class ModelBusy(Exception):
    """Another job of the same model is active: retry this one later (its message must not be dropped)."""


# What a failure is called, by the step it happened in (jobs.error_reason).
_STEP_ERRORS = {"load": "load_error", "unlearn": "engine_error", "evaluate": "evaluation_error",
                "register": "registry_error"}  # fmt: skip


class JobFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # a slug stored in jobs.error_reason
        self.detail = detail


@dataclass(frozen=True)
class JobSets:
    forget: TensorSplit
    remaining: TensorSplit
    remaining_sample: TensorSplit  # what evaluation reads: the remaining set can be the whole dataset
    audit: TensorSplit


def run_job(
    job_id: str,
    *,
    session_factory: SessionFactory,
    store: CheckpointStore,
    settings: Settings,
    runtime: Runtime | None = None,
    worker_id: str,
) -> str | None:
    """Run ``job_id`` to a terminal state and return it; None when there was nothing to do (a finished job, a
    redelivered message, a job another worker holds). Raises :class:`ModelBusy` when the claim must wait."""
    lease = timedelta(seconds=settings.job_lease_s)
    with session_factory.begin() as session:
        claimed = jobs_service.claim_job(session, job_id, worker_id, lease)
    if claimed is None:
        log.info("job %s: nothing to do (finished, or held by another worker)", job_id)
        return None
    if isinstance(claimed, jobs_service.ModelBusy):
        raise ModelBusy(f"model {claimed.model_id} is busy with job {claimed.running_job_id}")
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    job = _Job(claimed, session_factory, store, settings, runtime or Runtime.detect(), worker_id)
    return job.run()


class _Heartbeat:
    """Once per interval, from a background thread: write the latest progress and renew the lease in one
    short transaction, and set the cancellation token when the job should stop (cancel requested, or no longer
    ours). The engine's progress callback only stores the event: no database round trip in the training loop.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job
        self.token = CancellationToken()
        self.latest: dict[str, Any] = {
            "step": 0,
            "total_steps": 0,
            "epoch": 0,
            "total_epochs": 0,
            "losses": {},
        }
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{job.claimed.job_id}", daemon=True
        )

    def report(self, event: ProgressEvent) -> None:
        self.latest = dataclasses.asdict(event)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stopped.wait(self._job.settings.progress_interval_s):
            self.beat()

    def beat(self) -> None:
        job = self._job
        try:
            with job.session_factory.begin() as session:
                stop = jobs_service.record_progress(
                    session, job.claimed.job_id, self.latest, job.worker_id, job.lease
                )
        except SQLAlchemyError:
            # A blip: the lease outlives several missed beats. A lasting outage lets it lapse, as it should.
            log.warning("job %s: heartbeat failed", job.claimed.job_id, exc_info=True)
            return
        if stop:
            self.token.cancel()


class _Job:
    def __init__(
        self,
        claimed: ClaimedJob,
        session_factory: SessionFactory,
        store: CheckpointStore,
        settings: Settings,
        runtime: Runtime,
        worker_id: str,
    ) -> None:
        self.claimed = claimed
        self.session_factory = session_factory
        self.store = store
        self.settings = settings
        self.runtime = runtime
        self.worker_id = worker_id
        self.lease = timedelta(seconds=settings.job_lease_s)
        self.step = "load"

    def run(self) -> str | None:
        job_id = self.claimed.job_id
        try:
            with _Heartbeat(self) as heartbeat:
                return self._steps(heartbeat)
        except UnlearningCancelled:
            return self._end("canceled", "canceled", "cancel requested while the job ran; nothing registered")
        except JobFailed as exc:
            log.warning("job %s failed: %s", job_id, exc)
            return self._end("failed", exc.reason, exc.detail)
        except InvalidTransition as exc:
            log.warning("job %s: %s; leaving it alone", job_id, exc)
            return None
        except (OperationalError, InterfaceError):
            raise  # the database is unreachable: the lease lapses and the job is resumed later
        except Exception as exc:
            # Anything else would fail again on every retry: end the job with the step it broke in.
            log.exception("job %s failed while in step %s", job_id, self.step)
            return self._end("failed", _STEP_ERRORS[self.step], f"{type(exc).__name__}: {exc}")

    def _end(self, state: str, reason: str, detail: str) -> str | None:
        try:
            with self.session_factory.begin() as session:
                jobs_service.finish(
                    session, self.claimed.job_id, state, error_reason=reason, error_detail=detail,
                    worker_id=self.worker_id,
                )  # fmt: skip
        except InvalidTransition as exc:  # finished meanwhile, or another worker took it over
            log.warning("job %s: not ending it %s: %s", self.claimed.job_id, state, exc)
            return None
        return state

    def _steps(self, heartbeat: _Heartbeat) -> str:
        claimed = self.claimed
        spec = _spec(claimed.spec)
        config = _config(claimed.method, claimed.config)
        base = self._load_checkpoint(claimed.base_version.storage_uri, claimed.base_version.sha256, spec)
        sets = self._load_sets(config.seed)
        if claimed.state == "evaluating":  # an earlier attempt got this far: resume from its checkpoint
            stored = StoredObject(**claimed.resume["checkpoint"])
            model = self._load_checkpoint(stored.uri, stored.sha256, spec)
        else:
            self.step = "unlearn"
            model = unlearn(
                base, spec, sets.forget, sets.remaining, config,
                progress=heartbeat.report, cancel=heartbeat.token, runtime=self.runtime,
            )  # fmt: skip
            stored = self.store.put(state_dict_to_bytes(model))
            with self.session_factory.begin() as session:
                jobs_service.set_state(
                    session, claimed.job_id, "evaluating",
                    metrics={"checkpoint": dataclasses.asdict(stored)}, worker_id=self.worker_id,
                )  # fmt: skip
        self.step = "evaluate"
        labels = _reference_labels(base, sets, self.runtime)
        before = evaluate(base, sets, labels, config.seed, self.runtime)
        after = evaluate(model, sets, labels, config.seed, self.runtime)
        gate = audit_gate(before, after, self.settings)
        heartbeat.token.raise_if_cancelled()
        self.step = "register"
        return self._register(stored, config_to_dict(config), before, after, gate)

    def _register(
        self,
        stored: StoredObject,
        config: dict[str, Any],
        before: dict[str, Any],
        after: dict[str, Any],
        gate: dict[str, Any],
    ) -> str:
        claimed = self.claimed
        passed = bool(gate["passed"])
        state = "succeeded" if passed else "rejected"
        rejection = None if passed else "; ".join(gate["failures"])
        try:
            with self.session_factory.begin() as session:
                version = models_service.register_version(
                    session,
                    model_id=claimed.model_id,
                    parent_version_id=claimed.base_version.id,
                    stored=stored,
                    method=claimed.method,
                    config=config,
                    metrics_before=before,
                    metrics_after=after,
                    activate=passed,
                    rejection_reason=rejection,
                    job_id=claimed.job_id,
                    request_ids=[claimed.request_id],
                )
                if passed:
                    datasets_service.mark_forgotten(
                        session, claimed.dataset_id, claimed.forget_sample_ids, claimed.request_id, utcnow()
                    )
                jobs_service.finish(
                    session, claimed.job_id, state,
                    metrics={"before": before, "after": after, "gate": gate},
                    result_version_id=version.id,
                    error_reason=None if passed else "audit_gate", error_detail=rejection,
                    worker_id=self.worker_id,
                )  # fmt: skip
        except models_service.VersionConflict as exc:
            raise JobFailed("stale_base_version", exc.detail) from exc
        log.info("job %s %s: version %s of %s", claimed.job_id, state, version.number, claimed.model_name)
        return state

    def _load_checkpoint(self, uri: str, sha256: str, spec: ModelSpec) -> nn.Module:
        try:
            data = self.store.read(uri)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise CorruptCheckpoint(f"{uri} does not hash to {sha256}, the digest the registry recorded")
            return load_state_dict(data, spec)
        except (CheckpointNotFound, CorruptCheckpoint, CheckpointMismatch) as exc:
            raise JobFailed("checkpoint_integrity", str(exc)) from exc

    def _load_sets(self, seed: int) -> JobSets:
        claimed = self.claimed
        try:
            with self.session_factory() as session:
                resolved = datasets_service.resolve_sets(
                    session, claimed.dataset_id, claimed.forget_sample_ids
                )
            x = open_rows(Path(claimed.array_path))
            remaining = _tensor_split(x, resolved.remaining)
        except ProblemError as exc:  # unknown samples or dataset
            raise JobFailed("dataset_error", exc.detail) from exc
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise JobFailed("dataset_error", f"{claimed.array_path}: {exc}") from exc
        keep = self.settings.eval_remaining_rows
        sample = remaining
        if len(remaining) > keep:
            rows = torch.randperm(len(remaining), generator=torch.Generator().manual_seed(seed))[:keep]
            sample = remaining.subset(rows.sort().values)
        return JobSets(
            forget=_tensor_split(x, resolved.forget),
            remaining=remaining,
            remaining_sample=sample,
            audit=_tensor_split(x, resolved.audit),
        )


def _spec(data: dict[str, Any]) -> ModelSpec:
    try:
        return ModelSpec.from_dict(data)
    except (KeyError, ValueError) as exc:
        raise JobFailed("invalid_model_spec", str(exc)) from exc


def _config(method: str, overrides: dict[str, Any]) -> Any:
    try:
        return make_config(method, overrides)
    except ConfigError as exc:
        raise JobFailed("invalid_config", str(exc)) from exc


def open_rows(path: Path) -> np.ndarray:
    """``x`` of a dataset's ``.npz``: memory-mapped when the member is stored uncompressed (``np.savez``), so
    a job reads only the rows it indexes; read whole from a compressed archive (``np.savez_compressed``)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
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


def _tensor_split(x: np.ndarray, samples: SampleSet) -> TensorSplit:
    rows = samples.rows
    labels = None if samples.labels is None else torch.from_numpy(samples.labels)
    return TensorSplit(torch.from_numpy(np.ascontiguousarray(x[rows])), labels, torch.from_numpy(rows))


@dataclass(frozen=True)
class ReferenceLabels:
    """The labels accuracy is measured against: the dataset's, or for a label-free dataset the base model's
    predictions (accuracy then reads as agreement with the model before unlearning)."""

    source: str  # "dataset" | "base_model"
    forget: TensorSplit
    remaining: TensorSplit
    audit: TensorSplit


def _reference_labels(base: nn.Module, sets: JobSets, runtime: Runtime) -> ReferenceLabels:
    if sets.audit.y is not None:
        return ReferenceLabels("dataset", sets.forget, sets.remaining_sample, sets.audit)
    ctx = RunContext(runtime=runtime)

    def labelled(split: TensorSplit) -> TensorSplit:
        return TensorSplit(split.x, predict_logits(base, split.x, ctx).argmax(1), split.index)

    return ReferenceLabels(
        "base_model", labelled(sets.forget), labelled(sets.remaining_sample), labelled(sets.audit)
    )


def evaluate(
    model: nn.Module, sets: JobSets, labels: ReferenceLabels, seed: int, runtime: Runtime
) -> dict[str, Any]:
    """The paper's metrics in percent on never-seen (audit), forgotten and remaining samples, and per-class
    audit accuracy. ``audit_accuracy_forget_classes`` is the forget accuracy's yardstick: how the model does
    on never-seen samples of the classes it was asked to forget."""
    model = model.to(runtime.device).eval()
    audit, forget = labels.audit, labels.forget
    audit_y = audit.require_labels()
    paper = paper_metrics(
        model,
        train_retain=labels.remaining,
        train_forget=forget,
        test=audit,
        forget_classes=set(forget.require_labels().tolist()),
        asr_seed=seed,
        runtime=runtime,
    )
    per_class = {
        str(c): round(accuracy(model, audit.subset(torch.nonzero(audit_y == c).flatten()), runtime), 2)
        for c in sorted(set(audit_y.tolist()))
    }
    return {
        "labels": labels.source,
        "audit_accuracy": _rounded(paper["test"]),
        "audit_accuracy_per_class": per_class,
        "audit_accuracy_forget_classes": _rounded(paper["test_f"]),
        "forget_accuracy": _rounded(paper["train_f"]),
        "remaining_accuracy": _rounded(paper["train_r"]),
        "attack_success_rate": _rounded(paper["asr"]),
        "sizes": {"forget": len(forget), "remaining": len(labels.remaining), "audit": len(audit)},
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def audit_gate(before: dict[str, Any], after: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Pass when the model keeps its utility on never-seen data (audit accuracy drops at most
    ``gate_max_audit_drop`` points) and does no better on the forgotten samples than on never-seen ones of the
    same classes (forget accuracy at most that audit accuracy + ``gate_forget_margin`` points)."""
    audit_drop = round(before["audit_accuracy"] - after["audit_accuracy"], 2)
    yardstick = after["audit_accuracy_forget_classes"]
    if yardstick is None:  # the audit split has no sample of the forgotten classes: compare with all of it
        yardstick = after["audit_accuracy"]
    forget_excess = round(after["forget_accuracy"] - yardstick, 2)
    failures = []
    if audit_drop > settings.gate_max_audit_drop:
        failures.append(
            f"audit accuracy fell {audit_drop} points (at most {settings.gate_max_audit_drop} allowed)"
        )
    if forget_excess > settings.gate_forget_margin:
        failures.append(
            f"forget accuracy is {forget_excess} points above never-seen samples of the same classes "
            f"(at most {settings.gate_forget_margin} allowed)"
        )
    return {
        "passed": not failures,
        "failures": failures,
        "audit_drop": audit_drop,
        "max_audit_drop": settings.gate_max_audit_drop,
        "forget_excess": forget_excess,
        "forget_margin": settings.gate_forget_margin,
    }
