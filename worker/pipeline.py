"""One unlearning job from claim to registered version: the only worker code that touches the database.

Steps, each ending in its own commit, so that a job whose worker died resumes rather than redoes (its lease
lapses, another worker claims it again) and a crash never leaves half-written state:

1. claim: queued -> running, lease taken (or an abandoned running/evaluating job taken over). The audit
   rule is written into the job's metrics now, before any number it will judge exists; a resumed job keeps
   the rule it started with.
2. the model lineage's audit reference set: loaded from the store, or built here when the model has none
   (its first audited job; the job's progress says so) and registered in its own commit.
3. load the base version's checkpoint (hash-verified) and the job's samples; unlearn; store the new
   checkpoint (content-addressed, so a retry rewrites the same object); running -> evaluating with the
   checkpoint recorded in the job's metrics. A job claimed again in ``evaluating`` starts here from it.
4. audit (worker/audit), once per request the job holds (a job coalesces many): the per-sample
   membership test of the base and the new model on that request's samples, utility per class, the gate
   and the verdict; the population metrics beside them.
5. ONE transaction: register the version (active when at least one request's gate passed, else rejected),
   record the passing requests' samples as erased from the model since that version, settle their targets,
   and finish the job (succeeded | rejected). Nothing of it exists if any part fails.

A ``build_references`` job (``POST /models/{name}/audit-references``) runs step 2 alone, on demand.

A request whose audit failed is never dropped. In a job with other requests it is retried once: the failures
of the model's batches together in a coalescing job of ``escalation_method`` (default: exact retraining with
the model's recipe, which cannot leave membership behind), or each alone with its own method when there is
no escalation (a label-free dataset, or ``LETHE_ESCALATION_METHOD=""``). Alone, or failing its retry, it is
rejected: the model keeps its samples (they are not recorded as erased, and the next job of the model trains
on them as remaining data), the request is NOT fulfilled, its due date keeps running and a new request
(another method, or retrain) is needed. A rejected version and its checkpoint stay in the registry as
evidence of the attempt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import zipfile
from collections.abc import Sequence
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

from service.audit import service as audit_service
from service.audit.service import BUILD_KIND
from service.core.logs import log_context
from service.core.problems import ProblemError
from service.core.settings import Settings
from service.datasets import service as datasets_service
from service.datasets.service import SampleSet
from service.dispatch import JobDispatcher
from service.erasures import service as erasures_service
from service.erasures.service import Dispatch
from service.erasures.tables import ALREADY_ERASED
from service.jobs import service as jobs_service
from service.jobs.service import ClaimedJob, InvalidTransition
from service.models import service as models_service
from service.storage import CorruptObject, ObjectNotFound, ObjectStore, StoredObject
from service.storage.objects import LOCAL_SCHEME, S3_SCHEME
from worker.audit import AuditRules, LabelledRows, ReferenceSet, audit_unlearning, build_reference_set
from worker.audit.population import label_splits, population_metrics
from worker.checkpoints import CheckpointMismatch, load_state_dict, state_dict_to_bytes
from worker.engine.api import unlearn
from worker.engine.config import METHODS, ConfigError, TrainingConfig, config_to_dict, make_config
from worker.engine.data import TensorSplit
from worker.engine.progress import CancellationToken, ProgressEvent, UnlearningCancelled
from worker.engine.runtime import Runtime
from worker.engine.spec import ModelSpec
from worker.evaluation.metrics import ScoredModel
from worker.metrics import PhaseTimer

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]


class NothingReady(Exception):
    """The message's job is still in its coalescing wait (and no other job can be taken): retry the message
    in ``retry_in`` seconds (it must not be dropped)."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"no job can be taken now; retry in {retry_in:.1f} s")
        self.retry_in = retry_in


# What a failure is called, by the step it happened in (jobs.error_reason).
_STEP_ERRORS = {"load": "load_error", "references": "audit_references_error", "unlearn": "engine_error",
                "evaluate": "evaluation_error", "register": "registry_error"}  # fmt: skip


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
    forget_sample_ids: tuple[str, ...]
    forget_subject_ids: tuple[str | None, ...]

    @property
    def forget_rows(self) -> np.ndarray:
        return _rows(self.forget)

    @property
    def audit_rows(self) -> np.ndarray:
        return _rows(self.audit)


def _rows(split: TensorSplit) -> np.ndarray:
    assert split.index is not None  # every split the pipeline loads records its rows
    return split.index.numpy()


def _concat(first: TensorSplit, second: TensorSplit) -> TensorSplit:
    def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None or b is None else torch.cat([a, b])

    return TensorSplit(torch.cat([first.x, second.x]), cat(first.y, second.y), cat(first.index, second.index))


def run_job(
    job_id: str,
    *,
    session_factory: SessionFactory,
    store: ObjectStore,
    settings: Settings,
    runtime: Runtime | None = None,
    worker_id: str,
    dispatcher: JobDispatcher,
) -> str | None:
    """Take a job with the message for ``job_id`` (that one, or a more urgent one: see
    ``jobs.service.claim_job``), run it to a terminal state and return that state; None when there was
    nothing to do. Raises :class:`NothingReady` when the message must be retried later. Jobs the run queues
    (a request retried alone) go to ``dispatcher`` once committed."""
    with log_context(message_job_id=job_id):
        return _claim_and_run(
            job_id, session_factory=session_factory, store=store, settings=settings, runtime=runtime,
            worker_id=worker_id, dispatcher=dispatcher,
        )  # fmt: skip


def _claim_and_run(
    job_id: str,
    *,
    session_factory: SessionFactory,
    store: ObjectStore,
    settings: Settings,
    runtime: Runtime | None,
    worker_id: str,
    dispatcher: JobDispatcher,
) -> str | None:
    lease = timedelta(seconds=settings.job_lease_s)
    with session_factory.begin() as session:
        claimed = jobs_service.claim_job(session, job_id, worker_id, lease)
    if claimed is None:
        log.info("message for job %s: nothing to do (finished, or held by another worker)", job_id)
        return None
    if isinstance(claimed, jobs_service.NotReady):
        raise NothingReady(claimed.retry_in)
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    job = _Job(claimed, session_factory, store, settings, runtime or Runtime.detect(), worker_id, dispatcher)
    # Every line of the job's life names it, its model and the deletion requests it holds.
    request_ids = [target.request_id for target in claimed.targets]
    with log_context(job_id=claimed.job_id, model=claimed.model_name, deletion_request_ids=request_ids):
        try:
            return job.run()
        finally:
            _send_on(session_factory, dispatcher, claimed.model_id)


def _send_on(session_factory: SessionFactory, dispatcher: JobDispatcher, model_id: str) -> None:
    """A message for the model's next queued job: none is retried while the model is busy, so the worker
    that ends a model's job hands the model on (the sweeper covers a worker that dies first)."""
    try:
        with session_factory() as session:
            found = jobs_service.next_queued(session, model_id)
        if found is not None:
            dispatcher.dispatch(found[0], delay_s=found[1])
    except Exception:
        log.warning("could not send on model %s's next job; the sweeper will", model_id, exc_info=True)


class _Heartbeat:
    """Once per interval, from a background thread: write the latest progress and renew the lease in one
    short transaction, and set the cancellation token when the job should stop (cancel requested, or no longer
    ours). The engine's progress callback only stores the event: no database round trip in the training loop.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job
        self.token = CancellationToken()
        self.phase = "starting"  # audit_references | unlearning | auditing
        self.latest: dict[str, Any] = {
            "phase": self.phase,
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
        self.latest = {"phase": self.phase, **dataclasses.asdict(event)}

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
        store: ObjectStore,
        settings: Settings,
        runtime: Runtime,
        worker_id: str,
        dispatcher: JobDispatcher,
    ) -> None:
        self.claimed = claimed
        self.dispatcher = dispatcher
        self.session_factory = session_factory
        self.store = store
        self.settings = settings
        self.runtime = runtime
        self.worker_id = worker_id
        self.lease = timedelta(seconds=settings.job_lease_s)
        self.phases = PhaseTimer(claimed.kind, claimed.method)
        self.step = "load"

    @property
    def step(self) -> str:
        """The pipeline step the job is in: names the error if it breaks there, and times its phases."""
        return self._step

    @step.setter
    def step(self, name: str) -> None:
        self.phases.enter(name)
        self._step = name

    def run(self) -> str | None:
        outcome = "interrupted"  # the database went away: the lease lapses, the job resumes elsewhere
        try:
            state = self._run()
            outcome = state or "left_alone"
            return state
        finally:
            self.phases.ended(outcome)

    def _run(self) -> str | None:
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
        if self.claimed.kind == BUILD_KIND:
            return self._build_job(heartbeat)
        return self._unlearn_job(heartbeat)

    def _build_job(self, heartbeat: _Heartbeat) -> str:
        claimed = self.claimed
        spec = _spec(claimed.spec)
        base = load_checkpoint(
            self.store, claimed.base_version.storage_uri, claimed.base_version.sha256, spec
        )
        sets = self._load_sets(seed=0)
        self.step = "references"
        row, _refs = self._build_references(
            heartbeat, spec, base, sets, int(claimed.config["references"]), int(claimed.config["seed"])
        )
        with self.session_factory.begin() as session:
            jobs_service.finish(
                session, claimed.job_id, "succeeded", worker_id=self.worker_id,
                metrics={"reference_set_id": row, "references": _refs.describe()},
            )  # fmt: skip
        return "succeeded"

    def _unlearn_job(self, heartbeat: _Heartbeat) -> str:
        claimed = self.claimed
        if not claimed.forget_sample_ids:
            return self._nothing_left()
        spec = _spec(claimed.spec)
        config = _config(claimed.method, claimed.config)
        rules = self._pre_register_rules()
        base = load_checkpoint(
            self.store, claimed.base_version.storage_uri, claimed.base_version.sha256, spec
        )
        sets = self._load_sets(config.seed)
        self.step = "references"
        refs = self._references(heartbeat, spec, base, sets)
        if claimed.state == "evaluating":  # an earlier attempt got this far: resume from its checkpoint
            stored = StoredObject(**claimed.resume["checkpoint"])
            unlearn_seconds = claimed.resume.get("unlearn_seconds")
            model = load_checkpoint(self.store, stored.uri, stored.sha256, spec)
        else:
            self.step = "unlearn"
            heartbeat.phase = "unlearning"
            started = time.monotonic()
            model = unlearn(
                base, spec, sets.forget, sets.remaining, config,
                progress=heartbeat.report, cancel=heartbeat.token, runtime=self.runtime,
            )  # fmt: skip
            unlearn_seconds = round(time.monotonic() - started, 3)
            stored = self.store.put(state_dict_to_bytes(model))
            with self.session_factory.begin() as session:
                jobs_service.set_state(
                    session, claimed.job_id, "evaluating", worker_id=self.worker_id,
                    metrics={"rule": rules.to_dict(), "checkpoint": dataclasses.asdict(stored),
                             "unlearn_seconds": unlearn_seconds},
                )  # fmt: skip
        self.step = "evaluate"
        heartbeat.phase = "auditing"
        started = time.monotonic()
        # Each model's logits on each split are computed once, for the population metrics and the audit.
        scored_base, scored_model = ScoredModel(base, self.runtime), ScoredModel(model, self.runtime)
        splits = label_splits(scored_base, sets.forget, sets.remaining_sample, sets.audit, self.runtime)
        before = population_metrics(scored_base, splits, config.seed, self.runtime)
        after = population_metrics(scored_model, splits, config.seed, self.runtime)
        remaining = (splits.remaining.x, splits.remaining.require_labels().numpy())
        position = {sample_id: i for i, sample_id in enumerate(sets.forget_sample_ids)}
        audits: dict[str, dict[str, Any]] = {}
        for target in claimed.targets:
            if not target.sample_ids:
                continue
            heartbeat.token.raise_if_cancelled()
            rows = torch.tensor([position[sample_id] for sample_id in target.sample_ids], dtype=torch.long)
            audits[target.request_id] = audit_unlearning(
                scored_base, scored_model, refs,
                forget_x=sets.forget.x[rows], forget_rows=sets.forget_rows[rows.numpy()],
                forget_sample_ids=target.sample_ids,
                forget_subjects=[sets.forget_subject_ids[i] for i in rows.tolist()],
                audit_x=sets.audit.x, audit_rows=sets.audit_rows,
                rules=rules, runtime=self.runtime, seed=config.seed, remaining=remaining,
            )  # fmt: skip
        heartbeat.token.raise_if_cancelled()
        self.step = "register"
        passed = sorted(request_id for request_id, audit in audits.items() if audit["gate"]["passed"])
        metrics = {
            "rule": rules.to_dict(), "before": before, "after": after, "audits": audits,
            "gate": {"passed": bool(passed), "requests": len(audits), "requests_passed": len(passed)},
            "timings": {
                "unlearn_seconds": unlearn_seconds,
                "audit_seconds": round(sum(audit["seconds"] for audit in audits.values()), 3),
                "evaluation_seconds": round(time.monotonic() - started, 3),  # population metrics + audits
            },
            "environment": self.runtime.describe(),
        }  # fmt: skip
        return self._register(stored, config_to_dict(config), metrics, labelled=sets.forget.y is not None)

    def _nothing_left(self) -> str:
        """Every request of the job was erased from the model meanwhile (another request named the same
        samples): settle them as already erased, with the active version, and register nothing."""
        claimed = self.claimed
        with self.session_factory.begin() as session:
            for target in erasures_service.targets_of_job(session, claimed.job_id):
                erasures_service.settle(
                    session, target, "completed", self.worker_id, verdict=ALREADY_ERASED,
                    version_id=claimed.base_version.id,
                )  # fmt: skip
            jobs_service.finish(
                session, claimed.job_id, "succeeded", result_version_id=claimed.base_version.id,
                worker_id=self.worker_id,
            )  # fmt: skip
        return "succeeded"

    def _pre_register_rules(self) -> AuditRules:
        """The rule this job is judged by: written into its metrics before any number exists; a job claimed
        again keeps the rule it started with, whatever the settings say now."""
        stored = self.claimed.resume.get("rule")
        if stored is not None:
            return AuditRules(
                **{f.name: stored[f.name] for f in dataclasses.fields(AuditRules) if f.name in stored}
            )
        rules = rules_from_settings(self.settings)
        with self.session_factory.begin() as session:
            jobs_service.record_metrics(
                session, self.claimed.job_id, {"rule": rules.to_dict()}, self.worker_id
            )
        return rules

    def _references(
        self, heartbeat: _Heartbeat, spec: ModelSpec, base: nn.Module, sets: JobSets
    ) -> ReferenceSet:
        """The model lineage's reference set; built now when it has none (its first audited job)."""
        with self.session_factory() as session:
            row = audit_service.current_set(session, self.claimed.model_id)
            found = None if row is None else (row.storage_uri, row.checkpoint_sha256)
        if found is None:
            log.info("job %s: model %s has no audit reference set; building it", self.claimed.job_id,
                     self.claimed.model_name)  # fmt: skip
            _row, refs = self._build_references(
                heartbeat,
                spec,
                base,
                sets,
                self.settings.audit_references,
                self.settings.audit_reference_seed,
            )
            return refs
        try:
            refs = ReferenceSet.from_bytes(read_verified(self.store, *found))
            refs.train_columns(sets.forget_rows)
        except (KeyError, ValueError) as exc:
            raise JobFailed(
                "audit_references", f"the model's reference set cannot audit this job: {exc}"
            ) from exc
        return refs

    def _build_references(
        self, heartbeat: _Heartbeat, spec: ModelSpec, base: nn.Module, sets: JobSets, k: int, seed: int
    ) -> tuple[str, ReferenceSet]:
        """Train and score the references on every train sample still in the model, store and register."""
        heartbeat.phase = "audit_references"
        pool = _concat(sets.forget, sets.remaining)
        splits = label_splits(base, pool, sets.remaining_sample, sets.audit, self.runtime)
        recipe = TrainingConfig(**(self.claimed.training_recipe or {}))
        refs = build_reference_set(
            spec,
            LabelledRows(pool.x, splits.forget.require_labels().numpy(), _rows(pool)),
            LabelledRows(sets.audit.x, splits.audit.require_labels().numpy(), sets.audit_rows),
            recipe, k=k, seed=seed, runtime=self.runtime, progress=heartbeat.report, cancel=heartbeat.token,
        )  # fmt: skip
        stored = self.store.put(refs.to_bytes())
        with self.session_factory.begin() as session:
            row = audit_service.register_set(
                session, model_id=self.claimed.model_id, dataset_id=self.claimed.dataset_id,
                job_id=self.claimed.job_id, stored=stored, summary=refs.describe(),
            )  # fmt: skip
            row_id = row.id
        log.info("job %s: %d reference models built in %.1f s", self.claimed.job_id, k, refs.build_seconds)
        return row_id, refs

    def _load_sets(self, seed: int) -> JobSets:
        claimed = self.claimed
        return load_sets(
            self.session_factory, self.store, claimed.dataset_id, claimed.model_id, claimed.array_uri,
            claimed.forget_sample_ids, eval_remaining_rows=self.settings.eval_remaining_rows, seed=seed,
        )  # fmt: skip

    def _escalation(self, labelled: bool) -> tuple[str, dict[str, Any]] | None:
        """The method (and full configuration) failures of a batch are retried with; None: alone, as they
        were."""
        method = self.settings.escalation_method
        if not method or (method in METHODS and METHODS[method].label_aware and not labelled):
            return None
        recipe = self.claimed.training_recipe or {}
        try:
            fields = {f.name for f in dataclasses.fields(make_config(method))}
            overrides = {key: value for key, value in recipe.items() if key in fields}
            # A fresh draw, not the original model's initialisation stream.
            seed = int(self.claimed.config.get("seed", 0)) + 1
            return method, config_to_dict(make_config(method, {**overrides, "seed": seed}))
        except ConfigError:
            log.warning("escalation method %r is not usable; retrying alone", method, exc_info=True)
            return None

    def _register(
        self, stored: StoredObject, config: dict[str, Any], metrics: dict[str, Any], *, labelled: bool
    ) -> str:
        """One version for the whole job; each request settled by its own audit (see the module docstring)."""
        claimed = self.claimed
        audits = metrics["audits"]
        passed = [
            t for t in claimed.targets if t.request_id in audits and audits[t.request_id]["gate"]["passed"]
        ]
        activate = bool(passed)
        state = "succeeded" if activate else "rejected"
        failures = sorted({f for audit in audits.values() for f in audit["gate"]["failures"]})
        rejection = None if activate else "; ".join(failures)
        alone = len(claimed.targets) == 1
        follow_ups: list[Dispatch] = []
        failed: list[tuple[Any, dict[str, Any]]] = []
        try:
            with self.session_factory.begin() as session:
                version = models_service.register_version(
                    session,
                    model_id=claimed.model_id,
                    parent_version_id=claimed.base_version.id,
                    stored=stored,
                    method=claimed.method,
                    config=config,
                    metrics_before=metrics["before"],
                    metrics_after=metrics["after"],
                    activate=activate,
                    rejection_reason=rejection,
                    job_id=claimed.job_id,
                    request_ids=[t.request_id for t in (passed if activate else claimed.targets)],
                    actor=self.worker_id,
                )
                # First: the reports generated as requests settle below read the audits from the job.
                jobs_service.record_metrics(session, claimed.job_id, metrics, self.worker_id)
                rows = {t.id: t for t in erasures_service.targets_of_job(session, claimed.job_id)}
                for target in claimed.targets:
                    row = rows[target.target_id]
                    audit = audits.get(target.request_id)
                    if audit is None:  # erased meanwhile by another request: nothing of it was left to audit
                        erasures_service.settle(
                            session, row, "completed", self.worker_id, verdict=ALREADY_ERASED,
                            version_id=claimed.base_version.id,
                        )  # fmt: skip
                        continue
                    attempt = {"job_id": claimed.job_id, "method": claimed.method,
                               "verdict": audit["verdict"], "passed": audit["gate"]["passed"],
                               "version_id": version.id, "requests_in_job": len(claimed.targets)}  # fmt: skip
                    if audit["gate"]["passed"]:
                        erasures_service.complete(
                            session, row, dataset_id=claimed.dataset_id, sample_ids=target.sample_ids,
                            version_id=version.id, attempt=attempt, actor=self.worker_id,
                        )  # fmt: skip
                    elif alone or row.attempts:  # alone, or already retried once
                        erasures_service.settle(session, row, "rejected", self.worker_id, attempt=attempt)
                    else:
                        failed.append((row, attempt))
                if failed:
                    follow_ups = erasures_service.retry(
                        session, self.settings, failed, self.worker_id, escalate_to=self._escalation(labelled)
                    )
                jobs_service.finish(
                    session, claimed.job_id, state,
                    metrics=metrics,
                    result_version_id=version.id,
                    error_reason=None if activate else "audit_gate", error_detail=rejection,
                    worker_id=self.worker_id,
                )  # fmt: skip
        except models_service.VersionConflict as exc:
            raise JobFailed("stale_base_version", exc.detail) from exc
        for follow_up in follow_ups:  # committed: if the queue is down, the sweeper finds them
            try:
                self.dispatcher.dispatch(follow_up.job_id, delay_s=follow_up.delay_s)
            except Exception:
                log.exception("dispatch of job %s failed; it stays queued for the sweeper", follow_up.job_id)
        log.info(
            "job %s %s: version %s of %s; %d of %d requests erased, %d retried",
            claimed.job_id, state, version.number, claimed.model_name, len(passed), len(claimed.targets),
            len(failed),
        )  # fmt: skip
        return state


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
    array_uri: str,
    forget_sample_ids: Sequence[str],
    *,
    eval_remaining_rows: int,
    seed: int,
) -> JobSets:
    """The forget set, the remaining train set (and the seeded sample of it evaluation reads) and the audit
    split of a dataset, as tensors read from its array: memory-mapped from the store's local file (on a
    worker of an S3 store, its cache: fetched once per machine)."""
    try:
        with session_factory() as session:
            resolved = datasets_service.resolve_sets(session, dataset_id, model_id, forget_sample_ids)
        x = open_rows(_array_file(store, array_uri))
        remaining = _tensor_split(x, resolved.remaining)
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
        forget=_tensor_split(x, resolved.forget),
        remaining=remaining,
        remaining_sample=sample,
        audit=_tensor_split(x, resolved.audit),
        forget_sample_ids=resolved.forget.sample_ids,
        forget_subject_ids=resolved.forget.subject_ids,
    )


def rules_from_settings(settings: Settings) -> AuditRules:
    return AuditRules(
        level=settings.audit_level, max_audit_drop=settings.gate_max_audit_drop,
        max_class_drop=settings.gate_max_class_drop, min_samples=settings.audit_min_samples,
    )  # fmt: skip


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


def _array_file(store: ObjectStore, array_uri: str) -> Path:
    """The array's local file: the store's (verified), or a server path of a dataset registered before the
    store held arrays."""
    if array_uri.startswith((LOCAL_SCHEME, S3_SCHEME)):
        return store.local_path(array_uri)
    return Path(array_uri)


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
